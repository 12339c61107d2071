"""The server's own measure of a blocked event loop (``control/loop_lag.py``)."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from control.loop_lag import LAG_METRIC, LoopLag


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
