"""Reconnect backoff per gRPC's connection-backoff spec (doc/connection-backoff.md).

Jitter spreads a fleet's reconnects after a server restart, so the survivors
see a ramp rather than a stampede.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from dataclasses import field


@dataclass(slots=True)
class Backoff:
    initial: float = 1.0
    multiplier: float = 1.6
    jitter: float = 0.2
    maximum: float = 120.0
    rng: random.Random = field(default_factory=random.Random)
    _current: float = 0.0

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt; grows until ``reset``."""
        self._current = (
            self.initial
            if self._current == 0
            else min(self._current * self.multiplier, self.maximum)
        )
        return self._current * (1 + self.rng.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self._current = 0.0
