"""Keep CPython's cyclic garbage collector off the fan-out path.

With 10,000 streams the server holds millions of long-lived objects, and every full
collection walks all of them: measured here, a fleet-wide push triggered three full
collections of about 1.4 s each, half the push time (BENCHMARKS.md). The fleet
simulator's 10,000 agents are as many objects, and it runs the same policy. It is a
package of its own because the control server and the simulator both use it and
neither may import the other (the import contracts in pyproject.toml). ``gc.freeze()``
moves everything alive into a generation the collector never scans; it is O(1).
Objects that die after being frozen are still freed by reference counting; only
reference cycles among them wait, until the periodic ``gc.unfreeze()`` hands them
back to the collector.
"""

from __future__ import annotations

import asyncio
import gc
import time

FREEZE_EVERY_SECONDS = 2.0
UNFREEZE_EVERY_SECONDS = 600.0


def freeze_before_fanout() -> None:
    """Called right before a push to every agent: nothing alive now needs scanning."""
    gc.freeze()


async def run_gc_policy(
    freeze_every: float = FREEZE_EVERY_SECONDS, unfreeze_every: float = UNFREEZE_EVERY_SECONDS
) -> None:
    """Freeze survivors every few seconds; thaw them now and then so cycles are reclaimed."""
    last_thaw = time.monotonic()
    while True:
        await asyncio.sleep(freeze_every)
        if time.monotonic() - last_thaw >= unfreeze_every:
            gc.unfreeze()
            last_thaw = time.monotonic()
        else:
            gc.freeze()
