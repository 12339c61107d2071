"""The facts of what an agent really does, told as they happen, to whoever keeps count.

The agent tells its ``Witness`` each lease request it sends and the answer, each pause
it obeys, each directive it acts on, each capture and each upload. The base class
forgets them all: a real laptop keeps no such record. The fleet simulator passes its
ground truth (``simulator.truth``), which checks the agent's capture against its
leases without asking the code that gates it, and is what ``--truth`` writes.
"""

from __future__ import annotations


class Witness:
    """Ignores every fact; a subclass keeps the ones it needs."""

    __slots__ = ()

    def lease_requested(self, request_id: int, at: float) -> None:
        """Lease request ``request_id`` left at boottime ``at``."""

    def lease_answered(self, request_id: int, granted: bool, ttl: float) -> None:
        """The answer to ``request_id``: granted for ``ttl`` seconds (as clamped), or not."""

    def lease_revoked(self, at: float) -> None:
        """A pause was obeyed at boottime ``at``: no lease from then."""

    def captured(self, at: float, count: int, wall: float) -> None:
        """``count`` events were produced at boottime ``at`` (wall-clock ``wall``)."""

    def directive_applied(self, wall: float, epoch: int, mode: str) -> None:
        """The agent acked the directive at ``epoch`` in ``mode``."""

    def batch_sent(self, count: int) -> None:
        """An upload of ``count`` events was sent to the gateway (answered or not)."""

    def batch_accepted(self, count: int, last_event_at: float) -> None:
        """The gateway accepted ``count`` events, the latest captured at ``last_event_at``."""

    def batch_refused(self) -> None:
        """The gateway refused a batch."""
