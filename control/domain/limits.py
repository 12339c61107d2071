"""Limits at every door: token buckets, and the tally that aggregates refused calls.

A flood must cost the server little: a caller over its budget is refused before any
expensive work, and refusals that nobody authenticated (a bad join token, a revoked
certificate) are counted, not written to the audit log one fsync each. The tally
turns those counts into one audit record per source per interval; every refusal it
was told of is in exactly one record, so the counts add up.

Pure: the clock is passed in, nothing here touches gRPC or storage.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from control.domain.audit import AuditRecord

# Past this many keys, buckets that have refilled (their callers went quiet) are dropped:
# a flood from many addresses must not grow memory without bound.
MAX_TRACKED_KEYS = 10_000
# Distinct reasons kept per source per interval; the rest are counted as "other reasons".
# With reasons clipped to MAX_REASON_CHARS, all of them fit in one audit field (2000).
MAX_REASONS_PER_SOURCE = 18
# Sources tallied per interval; the rest are counted under OVERFLOW_SOURCE.
MAX_SOURCES_PER_INTERVAL = 1000
OVERFLOW_SOURCE = "other sources"
MAX_REASON_CHARS = 96
OTHER_REASONS = "other reasons"
AGGREGATED_ACTION = "refusals.aggregated"


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """One token bucket per key: ``burst`` tokens, refilled at ``rate`` a second."""

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        clock: Callable[[], float],
        max_keys: int = MAX_TRACKED_KEYS,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str) -> bool:
        """Spend one of ``key``'s tokens; False (and nothing spent) when it has none."""
        bucket = self._refilled(key)
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def give_back(self, key: str) -> None:
        """Return a token: the call it paid for turned out not to count against the caller."""
        bucket = self._refilled(key)
        bucket.tokens = min(self._burst, bucket.tokens + 1)

    def _refilled(self, key: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._forget_full()
            bucket = self._buckets[key] = _Bucket(self._burst, now)
            return bucket
        elapsed = max(0.0, now - bucket.at)
        bucket.tokens = min(self._burst, bucket.tokens + elapsed * self._rate)
        bucket.at = now
        return bucket

    def _forget_full(self) -> None:
        """A full bucket is the same as no bucket; if every one is in use, forget them all
        (a flood from over ``max_keys`` sources is refused by the other limits)."""
        now = self._clock()
        full = [
            key
            for key, b in self._buckets.items()
            if b.tokens + (now - b.at) * self._rate >= self._burst
        ]
        for key in full or list(self._buckets):
            del self._buckets[key]


@dataclass(frozen=True, slots=True)
class RefusalSource:
    """Who was refused, as far as the server could tell: the aggregation key."""

    actor: str
    role: str
    # The peer address, or the certificate serial: what the refused calls came from.
    source: str


class RefusalTally:
    """Counts refusals per source and reason until ``drain`` turns them into audit records."""

    def __init__(
        self,
        *,
        max_sources: int = MAX_SOURCES_PER_INTERVAL,
        max_reasons: int = MAX_REASONS_PER_SOURCE,
    ) -> None:
        self._max_sources = max_sources
        self._max_reasons = max_reasons
        self._counts: dict[RefusalSource, Counter[str]] = {}

    def count(self, source: RefusalSource, reason: str) -> None:
        reason = reason[:MAX_REASON_CHARS]
        if source not in self._counts and len(self._counts) >= self._max_sources:
            source = RefusalSource("unauthenticated", "", OVERFLOW_SOURCE)
        reasons = self._counts.setdefault(source, Counter())
        if reason not in reasons and len(reasons) >= self._max_reasons:
            reason = OTHER_REASONS
        reasons[reason] += 1

    @property
    def pending(self) -> int:
        """Refusals counted and not yet drained."""
        return sum(sum(reasons.values()) for reasons in self._counts.values())

    def drain(self, now: float) -> list[AuditRecord]:
        """One record per source, and an empty tally."""
        records = [_record(now, source, reasons) for source, reasons in self._counts.items()]
        self._counts = {}
        return records


def _record(now: float, source: RefusalSource, reasons: Counter[str]) -> AuditRecord:
    total = sum(reasons.values())
    return AuditRecord(
        now,
        source.actor,
        source.role,
        AGGREGATED_ACTION,
        target=source.source,
        result=f"denied: {total} calls",
        detail="; ".join(f"{count} x {reason}" for reason, count in reasons.most_common()),
    )
