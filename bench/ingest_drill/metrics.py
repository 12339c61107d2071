"""What the drill reads off the machine and the servers: load, and /metrics histograms.

The gateway's latency and group commits, and the control server's AuthorizeBatches
handling time, come from the processes' own Prometheus histograms, read before and
after a phase: the difference is what that phase did.
"""

from __future__ import annotations

import math
import time
import urllib.request
from pathlib import Path

AUTHORIZE = "AuthorizeBatches"


def load_average() -> str:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return f"{time.strftime('%H:%M:%S')} load {one} {five} {fifteen}"


def histogram(http_port: int, metric: str, label: str = "") -> dict[str, float]:
    """One histogram (and one label value of it) from a /metrics page: le -> count."""
    url = f"http://127.0.0.1:{http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    buckets: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{metric}_bucket") and label in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[le] = float(line.rsplit(" ", 1)[1])
    return buckets


def authorize_histogram(http_port: int) -> dict[str, float]:
    """The control server's AuthorizeBatches handling-time histogram."""
    return histogram(
        http_port, "killswitch_grpc_server_handling_seconds", f'grpc_method="{AUTHORIZE}"'
    )


def gateway_histograms(metrics_port: int) -> dict[str, dict[str, float]]:
    """The gateway's own authorization latency and group-commit figures."""
    return {
        name: histogram(metrics_port, f"killswitch_ingest_{name}")
        for name in ("authorization_seconds", "commit_seconds", "commit_batches")
    }


def histogram_figures(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Calls in between, the share done within 50 ms, and p50/p99 as bucket upper bounds."""
    delta = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
    total = delta.get("+Inf", 0.0)
    if not total:
        return {"calls": 0.0}
    bounds = sorted((float(le), n) for le, n in delta.items() if le != "+Inf")

    def upper(q: float) -> float:
        for bound, n in bounds:
            if n >= q * total:
                return bound
        return math.inf

    within = delta.get("0.05", math.nan)
    return {"calls": total, "within_50ms": within / total, "p50": upper(0.5), "p99": upper(0.99)}


def gateway_figures(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    return {name: histogram_figures(before[name], after[name]) for name in after}
