"""Release: the part of a rollout hold's scope that a runbook has already re-enabled.

Wave membership is a stable hash of the runbook's seed and the agent id, so a wave
never reshuffles between ticks, restarts or replicas, and a laptop that joins the
fleet later falls into its wave deterministically.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

# Shares are kept in basis points: integers compare exactly, 1% is 100.
FULL_SHARE = 10_000


def bucket(seed: str, agent_id: str) -> int:
    """The agent's place in ``[0, FULL_SHARE)`` for this seed; uniform and stable."""
    digest = hashlib.sha256(f"{seed}\x00{agent_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % FULL_SHARE


def format_share(basis_points: int) -> str:
    return f"{basis_points / 100:g}%"


@dataclass(frozen=True, slots=True)
class Release:
    """Agents a rollout hold no longer covers: a hash share plus whole label selectors."""

    seed: str
    share: int = 0
    selectors: tuple[tuple[tuple[str, str], ...], ...] = ()

    def releases(self, agent_id: str, labels: Mapping[str, str]) -> bool:
        if self.share >= FULL_SHARE:
            return True
        if any(all(labels.get(k) == v for k, v in selector) for selector in self.selectors):
            return True
        return self.share > 0 and bucket(self.seed, agent_id) < self.share

    @property
    def nothing(self) -> bool:
        return self.share == 0 and not self.selectors

    def describe(self) -> str:
        parts = [format_share(self.share)] if self.share else []
        parts += [",".join(f"{k}={v}" for k, v in selector) for selector in self.selectors]
        return " + ".join(parts) if parts else "nothing"
