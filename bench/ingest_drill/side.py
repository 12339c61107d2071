"""What one side of the ingest drill (product or baseline) measured."""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field

from bench.ingest_load import BurstResult
from bench.ingest_load import ProbeResult


@dataclass(slots=True)
class Side:
    """What one system (product or baseline) measured."""

    name: str
    steady_rate: float = math.nan
    expected_rate: float = math.nan
    window: float = 0.0
    probes: ProbeResult | None = None
    burst: BurstResult | None = None  # the median of the timed rounds
    rounds: list[float] = field(default_factory=list)  # every timed round, s
    cpu: dict[str, float] = field(default_factory=dict)  # % of a core over the window
    burst_cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per round
    rss_mib: dict[str, float] = field(default_factory=dict)
    authorize: dict[str, float] = field(default_factory=dict)
    authorize_burst: dict[str, float] = field(default_factory=dict)
    # The gateway's own histograms over the steady window and over the burst.
    gateway_steady: dict[str, dict[str, float]] = field(default_factory=dict)
    gateway_burst: dict[str, dict[str, float]] = field(default_factory=dict)
    load: list[str] = field(default_factory=list)
    sink_volume: str = ""  # what the sink's files sat on
    logs: dict[str, str] = field(default_factory=dict)
    drill: list[str] = field(default_factory=list)
