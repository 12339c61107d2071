"""How current this replica's view of the holds is, and what lease that view can back.

A lease granted on a view read at time ``v`` can only honour pauses committed before
``v``. So the lease is cut to end ``lease_ttl`` after ``v``, not after the grant: a
pause committed at ``c >= v`` then ends every lease this replica granted by
``v + lease_ttl <= c + lease_ttl``, which is the promise, however late the
notification of ``c`` arrives. A view older than ``MAX_VIEW_AGE_SHARE`` of the TTL
backs no lease at all: a replica whose re-reads keep failing stops leasing within
that bound, and its agents stop capturing within one TTL after it.

A sole writer (SQLite: one server, one database file) has no one else's commits to
miss: its view is current by construction.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# The oldest view that still backs a lease, as a share of the lease TTL (15 s of the
# default 60 s): a lease granted on it is still three quarters of a TTL long.
MAX_VIEW_AGE_SHARE = 0.25
# Re-read shared state at least this often, as a share of the TTL (5 s of 60 s), so
# a view missing only its notifications is never old enough to stop leasing.
RESYNC_SHARE = 1 / 12
DEFAULT_RESYNC_SECONDS = 5.0


def resync_seconds(lease_ttl: float, configured: float = DEFAULT_RESYNC_SECONDS) -> float:
    """How often a replica re-reads shared state without a notification."""
    return min(configured, lease_ttl * RESYNC_SHARE)


class SharedView:
    """When this replica last knew it had every committed hold change."""

    def __init__(
        self,
        lease_ttl: float,
        *,
        sole_writer: bool,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lease_ttl = lease_ttl
        self.max_age = lease_ttl * MAX_VIEW_AGE_SHARE
        self._sole_writer = sole_writer
        self._monotonic = monotonic
        # Monotonic time at which the newest adopted read started (its snapshot is no
        # older than that); -inf until the first read.
        self._current_as_of = float("-inf")

    def read_starting(self) -> float:
        """Call before a read of the shared state; pass the result to ``adopted``."""
        return self._monotonic()

    def adopted(self, read_started: float) -> None:
        """A read that started at ``read_started`` has been applied to memory."""
        self._current_as_of = max(self._current_as_of, read_started)

    def age(self) -> float:
        if self._sole_writer:
            return 0.0
        return self._monotonic() - self._current_as_of

    @property
    def stale(self) -> bool:
        return self.age() > self.max_age

    def lease_seconds(self) -> float:
        """The TTL a lease granted now may have: it ends one TTL after the view's time."""
        return max(0.0, self.lease_ttl - self.age())

    def describe_staleness(self) -> str:
        age = self.age()
        shown = "never read" if age == float("inf") else f"{age:.1f} s old"
        return (
            f"this replica's view of the holds is {shown} (limit {self.max_age:.1f} s):"
            " no leases until it re-reads them"
        )
