"""Periodic work that stops while the agent's process is suspended."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from collections.abc import Callable


async def every(
    period: Callable[[], float],
    action: Callable[[], Awaitable[None]],
    *,
    first_delay: float,
    awake: asyncio.Event,
) -> None:
    """Run ``action`` every ``period()`` seconds, the first after ``first_delay``.

    ``period`` is read each time because directives change intervals. Nothing runs
    while ``awake`` is clear: a suspended laptop does no work, late or otherwise.
    """
    await asyncio.sleep(first_delay)
    while True:
        await awake.wait()
        await action()
        await asyncio.sleep(period())
