"""Whether this replica's store takes writes now: leases, ``/readyz`` and the metric ask.

A lease nobody can write down would outlive what a restart or another replica knows,
so the plane grants and renews leases only while the store is healthy: the last beat
(a durable write) succeeded recently, and no write has failed since for a reason that
does not pass by itself (a full disk, a read-only file system or database, an I/O
error). Such a failure, from a beat or from any other write, counts at once; a store
that merely does not answer (a dropped connection the pool replaces) counts once no
beat has succeeded for ``answer_window`` seconds.
"""

from __future__ import annotations

import time

import structlog

from control.errors import StoreUnavailable
from control.errors import one_line
from control.store import causes

log = structlog.get_logger("killswitch.plane")


class StoreHealth:
    def __init__(self, answer_window: float) -> None:
        self._answer_window = answer_window
        # When (monotonic time) a beat last succeeded.
        self._last_answer = time.monotonic()
        # Why the last beat or write failed; "" once a beat succeeded after it.
        self._cause = ""
        self._cannot_write = False
        self._reported_healthy = True

    @property
    def healthy(self) -> bool:
        return not self._cannot_write and self.silent_for() <= self._answer_window

    @property
    def cause(self) -> str:
        """One line: why the store is unhealthy ("" while it is healthy)."""
        if self.healthy:
            return ""
        return self._cause or causes.NO_ANSWER

    def silent_for(self) -> float:
        """Seconds since a beat last succeeded."""
        return time.monotonic() - self._last_answer

    def restart(self) -> None:
        """The store answered as the plane loaded its state: count from now."""
        self._last_answer = time.monotonic()

    def beat_succeeded(self) -> None:
        self._last_answer = time.monotonic()
        self._cause, self._cannot_write = "", False
        self._report()

    def failed(self, error: Exception) -> None:
        """A beat or a write failed with ``error``."""
        if isinstance(error, StoreUnavailable):
            self._cause = error.cause
            self._cannot_write = self._cannot_write or error.cannot_write
        elif isinstance(error, TimeoutError):
            self._cause = causes.NO_ANSWER
        else:
            self._cause = f"store failed: {one_line(error) or type(error).__name__}"
        self._report()

    def check(self) -> None:
        """Log a change that came with time (no beat succeeded for too long)."""
        self._report()

    def _report(self) -> None:
        """One log line on each transition, naming the cause."""
        ok = self.healthy
        if ok is self._reported_healthy:
            return
        self._reported_healthy = ok
        if ok:
            log.warning("store_recovered", detail="granting and renewing leases again")
        else:
            log.error(
                "store_lost",
                cause=self.cause,
                detail="no leases until it is back: agents fail closed",
            )
