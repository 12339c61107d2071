"""The storage port: what the control plane needs from a durable store.

Implementations (``control.store.sqlite`` now, PostgreSQL later) must honour one
contract: holds and epochs are durable before a call returns, epochs are
allocated by the store and only ever go up, and agent rows are written in
batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from control.domain import AgentStatus, Desired, Hold, HoldDraft


@dataclass(frozen=True, slots=True)
class StoredAgent:
    agent_id: str
    labels: dict[str, str]
    desired: Desired
    status: AgentStatus


@dataclass(frozen=True, slots=True)
class LoadedState:
    epoch: int
    holds: list[Hold]
    agents: list[StoredAgent]


class Store(Protocol):
    async def load(self) -> LoadedState:
        """Everything needed to rebuild the in-memory state after a restart."""

    async def create_hold(self, draft: HoldDraft) -> Hold:
        """Commit the hold durably with a freshly allocated epoch."""

    async def lift_hold(self, hold_id: str, lifted_by: str, lifted_at: float) -> Hold:
        """Commit the lift durably with a freshly allocated epoch.

        Raises ``NotFound`` for an unknown hold and ``Conflict`` if already lifted.
        """

    async def save_agents(self, agents: Sequence[StoredAgent]) -> None:
        """Upsert a batch of agent rows in one transaction."""

    async def close(self) -> None: ...
