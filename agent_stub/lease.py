"""Capture leases: permission to capture that runs out by itself (fail closed).

An agent that cannot hear from the control plane must not capture forever, so
capture is allowed only before the expiry of the newest lease granted. Unknown
state means off: a fresh ``Lease`` (also after a restart) holds nothing.
"""

from __future__ import annotations

from agent_stub.clock import Clock

__all__ = ["Clock", "Lease"]


class Lease:
    """The agent's side of the lease protocol.

    The clock for a request starts when the agent *sends* it, and a grant counts
    from then, so this expiry is never later than the server's (grant time + TTL).
    ``clock`` must count sleep (``agent_stub.clock``), or a laptop waking past the
    expiry would still hold its lease.
    """

    __slots__ = ("_next_id", "_sent", "clock", "expires_at")

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._next_id = 1
        # Requests sent and not answered yet: request id -> send time.
        self._sent: dict[int, float] = {}
        self.expires_at: float | None = None

    def request(self) -> tuple[int, float]:
        """Start the clock for a new request; returns its id and send time. Send it at once."""
        request_id, sent_at = self._next_id, self.clock()
        self._next_id += 1
        self._sent[request_id] = sent_at
        return request_id, sent_at

    def answer(self, request_id: int, granted: bool, ttl: float) -> bool:
        """Apply a grant or a refusal; False (no effect) for an unknown or superseded request."""
        sent_at = self._sent.get(request_id)
        if sent_at is None:
            return False
        # An answer settles every older request too: their grants would only shorten it.
        self._sent = {i: t for i, t in self._sent.items() if i > request_id}
        if granted:
            self.expires_at = sent_at + ttl
        else:
            self.expires_at = None
        return True

    def revoke(self) -> None:
        """End the lease now; grants for requests already sent no longer count."""
        self._sent.clear()
        self.expires_at = None

    def holds(self, now: float) -> bool:
        """Is capture allowed at ``now`` (a reading of ``clock``)?"""
        return self.expires_at is not None and now < self.expires_at

    def remaining(self) -> float:
        """Seconds until expiry; 0 when no lease is held."""
        if self.expires_at is None:
            return 0.0
        return max(0.0, self.expires_at - self.clock())
