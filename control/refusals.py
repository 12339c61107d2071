"""Where refused calls go: a few to the audit log one by one, the rest counted.

An authenticated caller's refusals are audited one by one while its identity has
refusal budget left: probing is worth knowing about in detail. Past that budget,
and for every call nobody could authenticate (a bad join token or CSR, a revoked
certificate, a missing identity), refusals are only counted, and written as one
aggregated entry per source every ``interval`` seconds and when the server stops.
A flood costs one fsync per source per interval, not one per call, and no
refusal goes unrecorded: the aggregated counts add up to the calls refused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Sequence

import structlog

from control.domain.audit import AuditRecord
from control.domain.limits import RefusalSource
from control.domain.limits import RefusalTally
from control.domain.limits import TokenBuckets
from control.errors import KillswitchError
from control.errors import one_line

log = structlog.get_logger("killswitch.refusals")

AGGREGATION_SECONDS = 10.0
# Refusals of one identity audited one by one: ten at once, then one every six seconds.
REFUSAL_BUDGET_BURST = 10
REFUSAL_BUDGET_PER_SECOND = 1 / 6

AuditWriter = Callable[[Sequence[AuditRecord]], Awaitable[None]]


class RefusalLog:
    def __init__(
        self,
        write: AuditWriter,
        clock: Callable[[], float],
        *,
        interval: float = AGGREGATION_SECONDS,
    ) -> None:
        self._write = write
        self._clock = clock
        self._interval = interval
        self._budget = TokenBuckets(
            rate=REFUSAL_BUDGET_PER_SECOND, burst=REFUSAL_BUDGET_BURST, clock=clock
        )
        self._tally = RefusalTally()
        # Drained but not yet written (the store was down): written with the next flush.
        self._unwritten: list[AuditRecord] = []
        self._flushing = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    async def refused(self, record: AuditRecord, *, identity: str) -> None:
        """An authenticated caller's refusal: its own entry while ``identity`` has budget."""
        if self._budget.take(identity):
            await self._write([record])
        else:
            # Action and verdict only: the entries within budget said why, and a prober
            # varying its input must not spread its count over endless reasons.
            verdict = record.result.partition(":")[0]
            self.count(
                RefusalSource(record.actor, record.role, identity), f"{record.action}: {verdict}"
            )

    def count(self, source: RefusalSource, reason: str) -> None:
        """A refusal for the next aggregated entry; cheap enough to do for every call."""
        self._tally.count(source, reason)

    async def flush(self) -> None:
        async with self._flushing:
            self._unwritten += self._tally.drain(self._clock())
            if not self._unwritten:
                return
            await self._write(self._unwritten)
            log.info("refusals_aggregated", entries=len(self._unwritten))
            self._unwritten = []

    def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_every_interval(), name="refusals")

    async def stop(self) -> None:
        """Write whatever is counted: the last interval's refusals are not lost."""
        self._stopping.set()
        if self._flusher is not None:
            await self._flusher
        else:
            await self.flush()

    async def _flush_every_interval(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)
            try:
                await self.flush()
            except KillswitchError as exc:
                log.warning("refusals_not_written", error=one_line(exc), retry_in=self._interval)
            if self._stopping.is_set():
                return
