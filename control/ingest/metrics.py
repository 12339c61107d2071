"""The gateway's own figures on ``--metrics HOST:PORT`` (Prometheus text format).

Authorization latency is what the gateway adds before a batch is decided: from the
moment the upload is in hand to the verdict (its checks, the wait for a shared
``AuthorizeBatches`` call, the control plane's answer). Writing to the sink is timed
apart, per group commit, so a slow disk and a slow control plane are told apart.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Histogram
from prometheus_client import start_http_server

from control.addresses import ensure_can_listen
from control.addresses import split_host_port

# Milliseconds matter here: the target is a p99 of 50 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
GROUP_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2048)
OUTCOMES = ("accepted", "refused", "invalid", "unavailable")
VERDICT_SOURCES = ("standing_copy", "asked")


def _counted_by(
    registry: CollectorRegistry,
    name: str,
    documentation: str,
    label: str,
    values: Sequence[str],
) -> dict[str, Counter]:
    """A counter with one label, as its child for each of ``values``: bound once here,
    because ``labels()`` costs about 7 us a call, and the gateway counts every batch."""
    counter = Counter(name, documentation, [label], registry=registry)
    return {value: counter.labels(value) for value in values}


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.authorization = Histogram(
            "killswitch_ingest_authorization_seconds",
            "From an upload in hand to its verdict: checks and the control plane's answer.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.outcome = _counted_by(
            self.registry,
            "killswitch_ingest_batches",
            "Uploads by outcome: accepted (landed), refused (a verdict), invalid (bad"
            " input), unavailable (no control plane or no sink: refused, fail closed).",
            "outcome",
            OUTCOMES,
        )
        self.verdict_from = _counted_by(
            self.registry,
            "killswitch_ingest_verdicts",
            "Decided batches by where the verdict came from: the plane's standing copy"
            " (allowed, no question) or asked (AuthorizeBatches).",
            "source",
            VERDICT_SOURCES,
        )
        self.commit_seconds = Histogram(
            "killswitch_ingest_commit_seconds",
            "One group commit of the sink: every batch's record and manifest line, synced.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.commit_batches = Histogram(
            "killswitch_ingest_commit_batches",
            "Batches landed together by one group commit.",
            buckets=GROUP_BUCKETS,
            registry=self.registry,
        )

    def committed(self, seconds: float, batches: int) -> None:
        """The sink's report of each group commit."""
        self.commit_seconds.observe(seconds)
        self.commit_batches.observe(batches)

    def serve(self, address: str) -> int:
        """Serve ``/metrics`` on a thread; returns the port bound."""
        host, port = split_host_port(address, what="metrics")
        ensure_can_listen(host, port, what="metrics")
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
