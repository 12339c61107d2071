"""The clock the tests inject wherever the code under test reads the time."""

from __future__ import annotations


class FakeClock:
    """A clock the test moves by hand: set ``now`` or ``advance`` it (a laptop's sleep is
    just a big step)."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
