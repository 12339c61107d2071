"""Release: the part of a rollout hold's scope that a runbook has already re-enabled.

Laptops are ranked by a stable hash of the runbook's seed and their id; a share wave
takes an exact prefix of that ranking (see ``control.domain.rollout.Runbook.cutoffs``).
The release stores the rank key of the last laptop taken (the *cutoff*), frozen when
the wave starts: a wave never reshuffles between ticks, restarts or replicas, and a
laptop that joins later is released exactly when its key sorts at or before the cutoff.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

# Shares are kept in basis points: integers compare exactly, 1% is 100.
FULL_SHARE = 10_000


def rank_key(seed: str, agent_id: str) -> str:
    """The agent's place in this seed's ranking: uniform, stable, and distinct per agent.

    The whole SHA-256 in hex, so two laptops never tie and a plain string comparison
    orders them; the empty string sorts before every key (a cutoff releasing nobody).
    """
    return hashlib.sha256(f"{seed}\x00{agent_id}".encode()).hexdigest()


def format_share(basis_points: int) -> str:
    return f"{basis_points / 100:g}%"


@dataclass(frozen=True, slots=True)
class Release:
    """Agents a rollout hold no longer covers: a ranked prefix plus whole label selectors.

    ``share`` is what the runbook asked for (100% releases everyone, newcomers too);
    ``cutoff`` is the rank key of the last laptop the share waves took so far.
    """

    seed: str
    share: int = 0
    selectors: tuple[tuple[tuple[str, str], ...], ...] = ()
    cutoff: str = ""

    def releases(self, agent_id: str, labels: Mapping[str, str]) -> bool:
        if self.share >= FULL_SHARE:
            return True
        if any(all(labels.get(k) == v for k, v in selector) for selector in self.selectors):
            return True
        return bool(self.cutoff) and rank_key(self.seed, agent_id) <= self.cutoff

    @property
    def nothing(self) -> bool:
        return self.share == 0 and not self.selectors

    def describe(self) -> str:
        parts = [format_share(self.share)] if self.share else []
        parts += [",".join(f"{k}={v}" for k, v in selector) for selector in self.selectors]
        return " + ".join(parts) if parts else "nothing"
