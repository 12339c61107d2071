"""The arithmetic the benchmarks' reports share: percentiles and the product's target.

The issue's target is that the product costs at most 1.5x what a bare gRPC baseline
costs on the same machine; every report marks a headline ratio met or MISSED the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

TARGET_RATIO = 1.5


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; q=1 is the maximum."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def against_target(value: float) -> str:
    """A product/baseline ratio in bold, and whether it met the target."""
    return f"**{value:.2f}x** ({'met' if value <= TARGET_RATIO else 'MISSED'})"
