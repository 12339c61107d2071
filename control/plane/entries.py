"""One agent as the plane holds it in memory, and the live stream that serves it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Protocol

from control.domain import AgentStatus
from control.domain import Desired
from control.store import StoredAgent

if TYPE_CHECKING:  # the tally imports this module
    from control.plane.tally import Counted


class Subscriber(Protocol):
    """A live stream to one agent, as the plane sees it."""

    def notify(self) -> None:
        """The agent's desired state changed: send the current directive."""

    def close(self, reason: str) -> None:
        """End the stream (a newer stream for the same agent took over)."""


@dataclass(slots=True)
class AgentEntry:
    agent_id: str
    labels: dict[str, str]
    desired: Desired
    status: AgentStatus
    subscriber: Subscriber | None = None
    # last_seen as of the newest row handed to the store, and when that was.
    last_seen_saved: float = 0.0
    row_saved_at: float = 0.0
    # The lease expiry the store holds: written one TTL ahead of the real expiry, so
    # renewals need a write only every few rounds and a restarted server never thinks
    # a lease ended before it really did.
    lease_bound_saved: float = 0.0
    # Whether the newest row handed to the store shows a silent stream: the next word
    # from the agent must be written at once, or other replicas would keep it silent.
    silent_saved: bool = False
    # Set while another replica's row is the truth about this agent: ``status`` is
    # derived from it. This replica never writes such an entry.
    remote: StoredAgent | None = None
    # The verdict the fleet's tally counts for this agent, and the facts it came from
    # (``control.plane.tally``).
    counted: Counted | None = None
