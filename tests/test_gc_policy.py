"""The GC policy freezes survivors and thaws them again, so cycles are not kept forever."""

from __future__ import annotations

import asyncio
import gc

from gc_policy import run_gc_policy


def test_freezes_survivors_then_thaws_them() -> None:
    async def sample_freeze_counts() -> list[int]:
        gc.unfreeze()
        policy = asyncio.create_task(run_gc_policy(freeze_every=0.05, unfreeze_every=0.3))
        samples = []
        for _ in range(60):
            await asyncio.sleep(0.01)
            samples.append(gc.get_freeze_count())
        policy.cancel()
        return samples

    try:
        samples = asyncio.run(sample_freeze_counts())
    finally:
        gc.unfreeze()
    first_frozen = next(i for i, n in enumerate(samples) if n > 0)
    assert 0 in samples[first_frozen:], "frozen objects were never handed back to the collector"
