"""The enrolment port's tarpit, in-process: held refusals are answered spread out."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from control.rpc.enrolment_gate import EnrolmentGate


class NoRefusals:
    def count_unauthenticated(self, *args: Any) -> None:  # the recorder is not under test
        pass


def test_held_refusals_are_answered_at_spread_times_not_in_one_wave(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flood's calls arrive together; answered together, they come back together.

    Each held refusal sleeps a different time, between half and one and a half times
    the delay, so a flood's waves spread out instead of hitting the loop at once.
    """
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr("asyncio.sleep", sleep)
    gate = EnrolmentGate(NoRefusals(), clock=lambda: 0.0, refusal_delay=2.0)  # type: ignore[arg-type]

    async def hold_many() -> None:
        await asyncio.gather(*(gate._hold_refusal() for _ in range(200)))

    asyncio.run(hold_many())
    assert len(slept) == 200
    assert all(1.0 <= seconds <= 3.0 for seconds in slept), (min(slept), max(slept))
    assert max(slept) - min(slept) > 1.0, "the held refusals would all end in one wave"
    assert len(set(slept)) > 150
