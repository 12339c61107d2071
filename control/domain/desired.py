"""Effective desired state: what one agent must be doing, given the active holds.

This is the `spec` half of a Kubernetes-style object. Its ``epoch`` plays the
role of ``generation``: it moves only when the agent's own desired state
changes, and an agent is in sync once it acks an epoch at least that new.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from control.domain.holds import Hold


class Mode(StrEnum):
    PAUSED = "PAUSED"
    ALLOWED = "ALLOWED"


@dataclass(frozen=True, slots=True)
class Desired:
    mode: Mode
    hold_ids: tuple[str, ...]
    reason: str
    # Epoch at which this agent's desired state last changed.
    epoch: int
    # When (server time) it last changed; the ack deadline counts from here.
    since: float
    # On pause, delete unsent spool data unless every covering hold asks to keep it.
    purge_spool: bool = True


def covering_holds(agent_id: str, labels: Mapping[str, str], holds: Iterable[Hold]) -> list[Hold]:
    return [h for h in holds if h.active and h.covers(agent_id, labels)]


def _pause_reason(holds: list[Hold]) -> str:
    first = holds[0]
    text = f"{first.reason} [{first.ticket}]" if first.ticket else first.reason
    return text if len(holds) == 1 else f"{text} (+{len(holds) - 1} more holds)"


def reconcile_desired(
    previous: Desired | None,
    agent_id: str,
    labels: Mapping[str, str],
    holds: Iterable[Hold],
    *,
    epoch: int,
    now: float,
) -> Desired:
    """Return the agent's desired state at ``epoch``, keeping ``previous`` if nothing changed.

    PAUSED if any active hold covers the agent, otherwise ALLOWED: lifting one hold
    never re-enables an agent that another hold still covers. A change in the set of
    covering holds counts as a change, so every new hold is acknowledged afresh.
    """
    covering = sorted(covering_holds(agent_id, labels, holds), key=lambda h: h.created_epoch)
    hold_ids = tuple(h.id for h in covering)
    mode = Mode.PAUSED if covering else Mode.ALLOWED
    if previous is not None and previous.mode is mode and previous.hold_ids == hold_ids:
        return previous
    reason = _pause_reason(covering) if covering else "no active hold"
    purge = not covering or not all(h.keep_spool for h in covering)
    return Desired(
        mode=mode, hold_ids=hold_ids, reason=reason, epoch=epoch, since=now, purge_spool=purge
    )
