"""What the agent accepts from the server: TTLs and intervals it checks before using.

A compromised, buggy or misconfigured server must not be able to hand out a lease
that never ends, or make an agent go silent or flood the stream. Each bound is
defined once here; values beyond it are clamped, nonsense fails closed.
"""

from __future__ import annotations

import math

import structlog

log = structlog.get_logger("killswitch.agent.limits")

MAX_LEASE_TTL_SECONDS = 3600.0
"""The longest lease an agent holds (1 h), whatever a grant says.

The pause promise is "no capture later than the lease TTL after the pause"; an agent
the server can no longer reach keeps capturing for at most this long. Deployments use
a minute (tests a few seconds), so an hour leaves room and still ends a grant of
``1e12`` seconds the same day.
"""

MIN_INTERVAL_SECONDS = 0.05
"""The shortest heartbeat or lease-renewal interval the agent follows.

Below this a single agent would flood its stream (and a fleet its server). Tests run
with heartbeats of 0.5 s and leases of a few seconds (renewals near 1 s), so 50 ms
keeps them untouched.
"""

MAX_INTERVAL_SECONDS = 300.0
"""The longest heartbeat or lease-renewal interval the agent follows (5 min).

An agent that reports less often than this looks dead to the server, which then cannot
tell a stopped laptop from a silent one; renewals at most this far apart keep even a
1 h lease renewed many times over.
"""


def _sane(value: float) -> bool:
    return math.isfinite(value) and value > 0


def granted_ttl(ttl: float) -> float | None:
    """The lease length to hold for a grant of ``ttl`` seconds; None: hold no lease.

    Zero, negative, NaN and infinite TTLs are nonsense: no lease, one log line.
    """
    if not _sane(ttl):
        log.warning("lease_grant_refused", ttl=ttl, reason="TTL is not a positive number")
        return None
    if ttl > MAX_LEASE_TTL_SECONDS:
        log.warning("lease_ttl_clamped", ttl=ttl, ceiling=MAX_LEASE_TTL_SECONDS)
        return MAX_LEASE_TTL_SECONDS
    return ttl


def directive_ttl(ttl: float, current: float) -> float:
    """The lease TTL a directive announces (it paces renewals); ``current`` if unusable.

    Zero means "not set" (proto3) and keeps ``current`` silently.
    """
    if ttl == 0:
        return current
    usable = granted_ttl(ttl)
    return current if usable is None else usable


def heartbeat_interval(seconds: float, current: float) -> float:
    """A directive's heartbeat interval, clamped; ``current`` if unset (0) or nonsense."""
    if seconds == 0:
        return current
    if math.isnan(seconds) or seconds < 0:
        log.warning("heartbeat_interval_refused", seconds=seconds, kept=current)
        return current
    clamped = _clamp_interval(seconds)
    if clamped != seconds:
        log.warning("heartbeat_interval_clamped", seconds=seconds, to=clamped)
    return clamped


def renewal_interval(lease_ttl: float) -> float:
    """Renew at a third of the lease TTL, within the interval bounds.

    ``lease_ttl`` has passed ``directive_ttl`` already, so this is never logged.
    """
    return _clamp_interval(lease_ttl / 3)


def _clamp_interval(seconds: float) -> float:
    return min(max(seconds, MIN_INTERVAL_SECONDS), MAX_INTERVAL_SECONDS)
