"""How late the event loop runs a timer: the direct measure of a blocked loop.

Everything the server does for 10,000 agents shares one event loop, so a callback
that holds it (a parse, an encode, a collection) delays every stream and every
operator's call at once. A timer asked for every ``SAMPLE_SECONDS`` that fires late
was kept waiting exactly that long: ``killswitch_event_loop_lag_seconds`` counts it,
and a lag past ``STALL_SECONDS`` is also logged, with its length. (The fuzz campaign
and the load benchmarks read the histogram; the client's own view of a slow call also
holds its own scheduling and its GIL.)
"""

from __future__ import annotations

import asyncio

import structlog
from prometheus_client import CollectorRegistry, Histogram

log = structlog.get_logger("killswitch.loop")

SAMPLE_SECONDS = 0.02
# A loop held this long is worth a log line of its own (a stall, as the fuzz campaign
# counts them).
STALL_SECONDS = 0.1
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LAG_METRIC = "killswitch_event_loop_lag_seconds"


class LoopLag:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.lag = Histogram(
            LAG_METRIC,
            f"How much later than asked the event loop ran a timer set every {SAMPLE_SECONDS} s.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )

    async def run(self, every: float = SAMPLE_SECONDS) -> None:
        """Until cancelled: one sample per ``every`` seconds."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + every
            await asyncio.sleep(every)
            late = max(0.0, loop.time() - due)
            self.lag.observe(late)
            if late >= STALL_SECONDS:
                log.warning("event_loop_stalled", seconds=round(late, 3))
