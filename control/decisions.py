"""Who put an agent in its desired state, and under which ticket: for the laptop's notice.

The directive carries it so that the person at the laptop learns of a pause (or its
end) from the laptop itself, with the reason, the ticket and the decider, rather than
from the press.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from control.domain import Desired
from control.domain import Hold
from control.domain import HoldKind
from control.domain import Mode
from control.errors import UnknownItem
from control.known_holds import KnownHolds


@dataclass(frozen=True, slots=True)
class Decision:
    ticket: str = ""
    decided_by: str = ""
    # Paused by its owner's own opt-out only.
    opt_out: bool = False
    # Replaces the desired state's reason in the directive when set: on resume, which
    # pause ended rather than "no active hold".
    reason: str = ""


NO_DECISION = Decision()


def decision_for(
    desired: Desired, agent_id: str, labels: Mapping[str, str], holds: KnownHolds
) -> Decision:
    """PAUSED: the first covering hold (the one the reason names). ALLOWED: the hold
    whose lift at the agent's desired epoch re-enabled it, if it is still known."""
    if desired.mode is Mode.PAUSED:
        covering = [hold for hold in (_known(holds, i) for i in desired.hold_ids) if hold]
        if not covering:
            return NO_DECISION
        first = covering[0]
        opt_out = all(hold.kind is HoldKind.OPT_OUT for hold in covering)
        return Decision(first.ticket, first.created_by, opt_out)
    for hold in holds.lifted_at(desired.epoch):
        if hold.scope.covers(agent_id, labels):
            reason = f"the pause ({hold.reason}) was lifted"
            return Decision(hold.ticket, hold.lifted_by, reason=reason)
    return NO_DECISION


def _known(holds: KnownHolds, hold_id: str) -> Hold | None:
    try:
        return holds.get(hold_id)
    except UnknownItem:
        return None
