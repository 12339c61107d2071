"""How late the event loop runs a timer: the direct measure of a blocked loop.

Everything the server does for 10,000 agents shares one event loop, so a callback
that holds it (a parse, an encode, a collection) delays every stream and every
operator's call at once. A timer asked for every ``SAMPLE_SECONDS`` that fires late
was kept waiting exactly that long: ``killswitch_event_loop_lag_seconds`` counts it,
and a lag past ``STALL_SECONDS`` is also logged, with its length and how much of it
the garbage collector took (``gc_seconds``). The collector's pauses are a histogram of
their own, ``killswitch_gc_pause_seconds{generation}``: a full collection walks every
object the server holds. (The fuzz campaign and the load benchmarks read these; a
client's own view of a slow call also holds its own scheduling and its GIL.)
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client import Histogram

log = structlog.get_logger("killswitch.loop")

SAMPLE_SECONDS = 0.02
# A loop held this long is worth a log line of its own (a stall, as the fuzz campaign
# counts them).
STALL_SECONDS = 0.1
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LAG_METRIC = "killswitch_event_loop_lag_seconds"
GC_METRIC = "killswitch_gc_pause_seconds"


class LoopLag:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.lag = Histogram(
            LAG_METRIC,
            f"How much later than asked the event loop ran a timer set every {SAMPLE_SECONDS} s.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.gc_pause = Histogram(
            GC_METRIC,
            "How long each garbage collection held the process, by generation.",
            ["generation"],
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        # Filled by the collector's callback, emptied by the sampler: the callback runs
        # wherever an allocation triggers a collection, even inside a metric's lock, so
        # it only appends here and never touches a metric itself.
        self._collections: list[tuple[int, float]] = []
        self._collection_started = 0.0

    async def run(self, every: float = SAMPLE_SECONDS) -> None:
        """Until cancelled: one sample per ``every`` seconds."""
        loop = asyncio.get_running_loop()
        gc.callbacks.append(self._on_collection)
        try:
            while True:
                due = loop.time() + every
                await asyncio.sleep(every)
                late = max(0.0, loop.time() - due)
                self.lag.observe(late)
                collections, self._collections = self._collections, []
                for generation, took in collections:
                    self.gc_pause.labels(str(generation)).observe(took)
                if late >= STALL_SECONDS:
                    log.warning(
                        "event_loop_stalled",
                        seconds=round(late, 3),
                        gc_seconds=round(sum(took for _, took in collections), 3),
                    )
        finally:
            gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._collection_started = time.perf_counter()
        else:
            took = time.perf_counter() - self._collection_started
            self._collections.append((int(info["generation"]), took))
