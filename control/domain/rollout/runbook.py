"""A runbook as data: its waves, their gates, an optional drill pause, checked on load.

Which laptops each wave re-enables (``Runbook.cutoffs``, ``Runbook.wave_of``) is a
property of the runbook and the fleet, so it lives here beside the waves it ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from control.domain.release import FULL_SHARE
from control.domain.release import Release
from control.domain.release import format_share
from control.domain.release import rank_key
from control.domain.scope import Scope
from control.domain.scope import format_labels
from control.errors import InvalidInput

DEFAULT_SOAK_SECONDS = 300.0
DEFAULT_WAVE_TIMEOUT_SECONDS = 900.0
DEFAULT_PAUSE_TIMEOUT_SECONDS = 600.0


class OnFailure(StrEnum):
    # Re-pause every wave the run enabled, then halt (the default: fail closed).
    REPAUSE = "repause"
    # Halt where it is: enabled waves keep capturing, nothing more is enabled.
    HALT = "halt"


@dataclass(frozen=True, slots=True)
class PrometheusGate:
    """An instant query whose value must stay within bounds (no data fails unless allowed).

    ``source`` names a Prometheus the server was configured with, never an address: a
    runbook must not choose where the server sends requests."""

    query: str
    source: str
    max_value: float | None = None
    min_value: float | None = None
    allow_no_data: bool = False

    def limit(self) -> str:
        bounds = []
        if self.min_value is not None:
            bounds.append(f">= {self.min_value:g}")
        if self.max_value is not None:
            bounds.append(f"<= {self.max_value:g}")
        return " and ".join(bounds)


@dataclass(frozen=True, slots=True)
class Gates:
    """What a wave must show before the next one starts; the defaults are the strict
    ones, so a runbook that names no gates still stops at the first sign of trouble."""

    # Share of the wave's connected agents confirmed CAPTURING before the wave passes.
    min_capturing: float = 1.0
    # Fleet-wide: any violation anywhere fails the wave at once.
    max_violations: int = 0
    # Among agents re-enabled so far: nacked (FAILED) and OVERDUE counts.
    max_nacks: int = 0
    max_overdue: int = 0
    prometheus: PrometheusGate | None = None


@dataclass(frozen=True, slots=True)
class Wave:
    """One step: a cumulative share of the hold's agents ranked by hash, or a label selector.

    A share wave takes at least ``max(1, min_agents)`` laptops not re-enabled before,
    while any remain; a selector wave takes exactly the laptops its labels match.
    """

    name: str
    share: int | None = None
    selector: Mapping[str, str] | None = None
    min_agents: int = 0
    soak: float = DEFAULT_SOAK_SECONDS
    timeout: float = DEFAULT_WAVE_TIMEOUT_SECONDS
    confirm: bool = False
    gates: Gates = Gates()

    def describe(self) -> str:
        if self.selector is not None:
            return f"selector {format_labels(self.selector)}"
        return f"{format_share(self.share or 0)} of agents"


@dataclass(frozen=True, slots=True)
class PauseStep:
    """A drill first pauses its scope itself and measures the time to a verified stop."""

    scope: Scope
    reason: str
    ticket: str = ""
    timeout: float = DEFAULT_PAUSE_TIMEOUT_SECONDS


# The hold a runbook lifts: named by the approved resume request it is started with.
FROM_APPROVAL = "from-approval"


@dataclass(frozen=True, slots=True)
class Runbook:
    name: str
    seed: str
    waves: tuple[Wave, ...]
    description: str = ""
    hold: str = FROM_APPROVAL
    pause: PauseStep | None = None
    on_failure: OnFailure = OnFailure.REPAUSE

    def __post_init__(self) -> None:
        check_waves(self.waves)

    def cutoffs(self, members: Iterable[tuple[str, Mapping[str, str]]]) -> tuple[str, ...]:
        """Per wave, the rank key of the last laptop re-enabled so far by share waves.

        ``members`` are the laptops of the scope being re-enabled. Ranked by
        ``rank_key``, share wave ``i`` re-enables the first ``ceil(share_i x N)`` of the
        N members (counting laptops an earlier selector wave took), extended until it
        holds at least ``max(1, min_agents)`` laptops not re-enabled before, while any
        remain. Exact counts, never an empty share wave over a non-empty scope, and
        membership is a prefix of one ranking, so a laptop never precedes one ranked
        before it (see README "Runbooks" for what stays sticky as the fleet changes).
        """
        ranked = sorted((rank_key(self.seed, agent_id), labels) for agent_id, labels in members)
        selectors: list[Mapping[str, str]] = []
        taken = 0
        cutoffs: list[str] = []
        for wave in self.waves:
            if wave.selector is not None:
                selectors.append(wave.selector)
            else:
                target = -(-(wave.share or 0) * len(ranked) // FULL_SHARE)
                wanted, fresh = max(1, wave.min_agents), 0
                while taken < len(ranked) and (taken < target or fresh < wanted):
                    labels = ranked[taken][1]
                    fresh += not any(_matches(labels, s) for s in selectors)
                    taken += 1
            cutoffs.append(ranked[taken - 1][0] if taken else "")
        return tuple(cutoffs)

    def release_through(self, wave_index: int, cutoff: str) -> Release:
        """What the rollout hold no longer covers once waves ``0..wave_index`` are enabled."""
        waves = self.waves[: wave_index + 1]
        share = max((w.share or 0 for w in waves), default=0)
        selectors = tuple(
            tuple(sorted(w.selector.items())) for w in waves if w.selector is not None
        )
        return Release(self.seed, share, selectors, cutoff)

    def wave_of(self, agent_id: str, labels: Mapping[str, str], cutoffs: Sequence[str]) -> int:
        """The first wave that re-enables this agent (every agent has one: the last is 100%).

        The same answer as the first ``release_through(i, cutoffs[i])`` that releases it,
        with one hash at most: runs ask this for every agent on every tick.
        """
        key: str | None = None
        for index, (wave, cutoff) in enumerate(zip(self.waves, cutoffs, strict=True)):
            if wave.selector is not None:
                if _matches(labels, wave.selector):
                    return index
                continue
            if key is None:
                key = rank_key(self.seed, agent_id)
            if cutoff and key <= cutoff:
                return index
        return len(self.waves) - 1

    def min_duration(self) -> float:
        return sum(w.soak for w in self.waves)


def _matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_waves(waves: Sequence[Wave]) -> None:
    """Shares only grow and the last wave re-enables everyone: a run always has an end."""
    if not waves:
        raise InvalidInput("a runbook needs at least one wave")
    previous = 0
    for number, wave in enumerate(waves, start=1):
        if (wave.share is None) == (wave.selector is None):
            raise InvalidInput(f"wave {number} needs exactly one of share or selector")
        if wave.share is not None:
            if not 0 < wave.share <= FULL_SHARE:
                raise InvalidInput(f"wave {number}: share must be more than 0% and at most 100%")
            if wave.share <= previous:
                raise InvalidInput(
                    f"wave {number}: shares are cumulative and must grow"
                    f" ({format_share(wave.share)} after {format_share(previous)})"
                )
            previous = wave.share
        elif wave.min_agents:
            raise InvalidInput(f"wave {number}: min_agents applies to share waves only")
        if wave.min_agents < 0:
            raise InvalidInput(f"wave {number}: min_agents must be 0 or more")
        if wave.soak < 0 or wave.timeout <= 0 or wave.timeout < wave.soak:
            raise InvalidInput(f"wave {number}: need 0 <= soak <= timeout and timeout > 0")
        if not 0 <= wave.gates.min_capturing <= 1:
            raise InvalidInput(f"wave {number}: capturing share must be within 0..100%")
    if waves[-1].share != FULL_SHARE:
        raise InvalidInput("the last wave must re-enable 100% of agents, so the run can finish")
