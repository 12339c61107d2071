"""The server's own measure of a blocked event loop (``control/loop_lag.py``)."""

from __future__ import annotations

import asyncio
import gc
import time

from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from control.loop_lag import GC_METRIC
from control.loop_lag import LAG_METRIC
from control.loop_lag import LoopLag


def stalls_counted(registry: CollectorRegistry) -> float:
    """Samples later than 100 ms: every sample minus those within the 0.1 bucket."""
    total = registry.get_sample_value(f"{LAG_METRIC}_count")
    within = registry.get_sample_value(f"{LAG_METRIC}_bucket", {"le": "0.1"})
    assert total is not None and within is not None
    return total - within


def test_a_callback_holding_the_loop_is_counted_and_logged_with_its_length() -> None:
    async def scenario() -> CollectorRegistry:
        registry = CollectorRegistry()
        sampler = asyncio.create_task(LoopLag(registry).run(every=0.01))
        await asyncio.sleep(0.1)  # quiet: samples, no stall
        assert stalls_counted(registry) == 0
        time.sleep(0.3)  # noqa: ASYNC251 (deliberate: a parse on the loop, everything waits)
        await asyncio.sleep(0.05)
        sampler.cancel()
        return registry

    with capture_logs() as logs:
        registry = asyncio.run(scenario())
    assert stalls_counted(registry) == 1
    (stall,) = [e for e in logs if e["event"] == "event_loop_stalled"]
    assert 0.25 <= stall["seconds"] < 1.0


def test_a_long_collection_is_timed_by_generation_and_named_in_the_stall() -> None:
    async def scenario() -> CollectorRegistry:
        registry = CollectorRegistry()
        sampler = asyncio.create_task(LoopLag(registry).run(every=0.01))
        await asyncio.sleep(0.05)
        garbage = []
        for _ in range(300_000):  # cycles, so the collector has something to walk
            cell: list[object] = []
            cell.append(cell)
            garbage.append(cell)
        del garbage, cell
        gc.collect()
        await asyncio.sleep(0.05)
        sampler.cancel()
        return registry

    with capture_logs() as logs:
        registry = asyncio.run(scenario())
    full = registry.get_sample_value(f"{GC_METRIC}_count", {"generation": "2"})
    assert full is not None and full >= 1
    stalls = [e for e in logs if e["event"] == "event_loop_stalled"]
    assert stalls, "walking 300,000 cycles holds the loop past 100 ms"
    assert any(0 < e["gc_seconds"] <= e["seconds"] for e in stalls), stalls
    took = registry.get_sample_value(f"{GC_METRIC}_sum", {"generation": "2"})
    assert took is not None and took > 0
