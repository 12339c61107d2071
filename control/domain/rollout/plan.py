"""A dry run: which agents each wave would re-enable over the fleet now."""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field

from control.domain.rollout.runbook import Runbook
from control.domain.scope import Scope


@dataclass(frozen=True, slots=True)
class WavePlan:
    index: int
    name: str
    target: str
    agent_ids: list[str] = field(default_factory=list)
    # Agents of this wave that another hold keeps paused whatever the run does.
    held_back: list[str] = field(default_factory=list)
    soak: float = 0.0
    starts_after: float = 0.0
    confirm: bool = False


def plan_waves(
    book: Runbook,
    scope: Scope,
    agents: Iterable[tuple[str, Mapping[str, str], bool]],
) -> list[WavePlan]:
    """Which agents each wave re-enables; ``agents`` yields (id, labels, held by another hold)."""
    members = sorted(
        (agent for agent in agents if scope.covers(agent[0], agent[1])), key=lambda a: a[0]
    )
    cutoffs = book.cutoffs((agent_id, labels) for agent_id, labels, _ in members)
    plans: list[WavePlan] = []
    offset = 0.0
    for index, wave in enumerate(book.waves):
        plans.append(
            WavePlan(
                index,
                wave.name,
                wave.describe(),
                soak=wave.soak,
                starts_after=offset,
                confirm=wave.confirm,
            )
        )
        offset += wave.soak
    for agent_id, labels, held in members:
        plan = plans[book.wave_of(agent_id, labels, cutoffs)]
        (plan.held_back if held else plan.agent_ids).append(agent_id)
    return plans
