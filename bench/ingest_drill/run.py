"""One side of the ingest drill, from fresh processes to a ``Side``: round, window, drill.

``Bench.run`` starts the control server, the sink (the real gateway, or the bare
baseline sink) and the lease holders; times one round of uploads at once before the
fleet starts; then starts the fleet, measures the steady window, and (product only)
runs the drill.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from bench.bare_sink import count_records
from bench.console import log
from bench.harness import Operator
from bench.harness import by_state
from bench.harness import poll
from bench.harness import wait_answering
from bench.ingest_drill.drill import drill
from bench.ingest_drill.metrics import authorize_histogram
from bench.ingest_drill.metrics import gateway_figures
from bench.ingest_drill.metrics import gateway_histograms
from bench.ingest_drill.metrics import histogram_figures
from bench.ingest_drill.metrics import load_average
from bench.ingest_drill.processes import Fleet
from bench.ingest_drill.processes import Measured
from bench.ingest_drill.processes import start_bare_sink
from bench.ingest_drill.processes import start_gateway
from bench.ingest_drill.processes import start_lease_holders
from bench.ingest_drill.processes import start_server
from bench.ingest_drill.processes import wait_listening
from bench.ingest_drill.side import Side
from bench.ingest_load import BurstResult
from bench.ingest_load import burst
from bench.ingest_load import next_sequences
from bench.ingest_load import probe
from bench.ingest_load import sink_batches
from bench.procs import free_port
from bench.procs import log_summary
from bench.volume import own_volume

# The lease holders' start-up work (first heartbeats, first renewals) spreads over one
# renewal interval, 20 s at the default TTL: the round starts once it is behind them.
# (Measured alone and settled they take 0.2 of a core; through the rounds of 00:23 and
# 00:36 UTC on 2026-12-05 they still took about 0.7 after this wait: cause not found.)
SETTLE_SECONDS = 30.0


@dataclass
class Bench:
    """Runs each side in its own directory under ``root``; ``sides`` keeps what each measured."""

    args: argparse.Namespace
    root: Path
    sides: dict[str, Side] = field(default_factory=dict)
    # The sinks' volumes, unmounted once every process has stopped.
    volumes: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def n(self) -> int:
        return int(self.args.agents)

    def probe_ids(self) -> list[str]:
        return [f"probe-{i:05d}" for i in range(self.args.probes)]

    @property
    def burst_n(self) -> int:
        return 0 if self.args.skip_burst else self.args.burst_agents or self.n

    def burst_ids(self) -> list[str]:
        """Agents only the round uploads as: no fleet agent takes their numbers meanwhile.

        (Until 18:10 UTC on 2026-12-03 the round took the numbers of the fleet's own
        agents while they uploaded, and a sixth of its batches were sent twice.)
        """
        return [f"burst-{i:05d}" for i in range(self.burst_n)]

    def run(self, product: bool) -> Side:
        args = self.args
        side = Side("product" if product else "baseline")
        self.sides[side.name] = side  # what it measured is reported even if a later phase fails
        here = self.root / side.name
        here.mkdir()
        sink_dir = here / ("ingest" if product else "bare")
        side.sink_volume = self.volumes.enter_context(own_volume(sink_dir))
        grpc_port, http_port, sink_port = free_port(), free_port(), free_port()
        metrics_port = free_port()
        server = start_server(here, grpc_port, http_port, args.lease_ttl)
        op = Operator(f"127.0.0.1:{grpc_port}", None)
        wait_answering(op, server, 60)
        if product:
            sink = start_gateway(here, sink_dir, sink_port, grpc_port, metrics_port)
        else:
            sink = start_bare_sink(here, sink_dir, sink_port)
        wait_listening(sink, sink_port)
        ingest = f"127.0.0.1:{sink_port}"
        probes = start_lease_holders(here, grpc_port, args.probes, "probe")
        if not args.skip_burst:
            holders = start_lease_holders(here, grpc_port, self.burst_n, "burst")
            self.wait_capturing(op, side, args.probes + self.burst_n)
            # Their first heartbeats and lease renewals fall over the first interval
            # after the connect: the round is measured once they are behind them.
            log(f"{side.name}: {SETTLE_SECONDS:g}s for the lease holders to settle")
            time.sleep(SETTLE_SECONDS)
            self.timed_round(
                side,
                product=product,
                ingest=ingest,
                children={"server": server, "sink": sink, "lease holders": holders},
                http_port=http_port,
                metrics_port=metrics_port,
                here=here,
            )
            # Gone before the fleet starts: until 21:30 UTC on 2026-12-05 they held their
            # leases through the steady window and the drill, 10,000 agents more on the box.
            holders.stop(grace=10)
        fleet = Fleet.start(self.args, here, grpc_port, ingest)
        everyone = self.n + args.probes + self.burst_n
        self.wait_capturing(op, side, self.n + args.probes, total=everyone)
        log(f"{side.name}: one upload interval to steady")
        time.sleep(args.upload_every + 5)

        def landed() -> int:
            if product:
                return sink_batches(sink_dir)
            return count_records(sink_dir / "bare-sink.log")[0]

        children: dict[str, Measured] = {"server": server, "sink": sink, "fleet": fleet}
        cpu0 = {k: c.cpu_seconds() for k, c in children.items()}
        hist0 = authorize_histogram(http_port)
        gateway0 = gateway_histograms(metrics_port) if product else {}
        count0, t0 = landed(), time.monotonic()
        log(f"{side.name}: steady window of {args.window:g}s with {args.probes} probes")
        side.probes = asyncio.run(
            probe(ingest, self.probe_ids(), args.window, args.probe_every, args.upload_every)
        )
        count1, t1 = landed(), time.monotonic()
        side.window = t1 - t0
        side.steady_rate = (count1 - count0) / side.window
        side.expected_rate = self.n / args.upload_every
        side.cpu = {k: 100 * (c.cpu_seconds() - cpu0[k]) / side.window for k, c in children.items()}
        side.rss_mib = {k: c.rss_kib() / 1024 for k, c in children.items()}
        if product:
            side.authorize = histogram_figures(hist0, authorize_histogram(http_port))
            side.gateway_steady = gateway_figures(gateway0, gateway_histograms(metrics_port))
        side.load.append(load_average())

        if product and not args.skip_drill:
            side.drill = drill(args, op, grpc_port, fleet, here)
            side.load.append(load_average())
        for child in (probes, fleet, sink, server):
            child.stop(grace=10)
        side.logs = {
            "server": log_summary(server.log_path),
            "gateway" if product else "bare sink": log_summary(sink.log_path),
        }
        op.close()
        return side

    def wait_capturing(
        self, op: Operator, side: Side, agents: int, total: int | None = None
    ) -> None:
        """Until exactly ``agents`` capture, of ``total`` the server counts (``agents`` by
        default; the round's agents stay counted once their holders stop)."""
        side.load.append(load_average())
        log(f"{side.name}: waiting for {agents} agents to capture")
        counted = agents if total is None else total
        took = poll(
            op,
            "every agent capturing",
            lambda s: s.total == counted and by_state(s).get("CAPTURING", 0) == agents,
            since=time.time(),
            timeout=max(120.0, agents / 50),
            interval=1.0,
        )
        log(f"{side.name}: {agents} agents capturing after {took:.0f}s")

    def timed_round(
        self,
        side: Side,
        *,
        product: bool,
        ingest: str,
        children: dict[str, Measured],
        http_port: int,
        metrics_port: int,
        here: Path,
    ) -> None:
        """One batch for every burst agent at once: a warm-up round (their directories
        and files made, as a fleet's are), then the round that is timed."""
        args, ids = self.args, self.burst_ids()

        def sequences_of(agents: Sequence[str]) -> dict[str, int]:
            if product:
                return next_sequences(here / "ingest", agents)
            return dict.fromkeys(agents, 1)

        def one_round() -> BurstResult:
            return asyncio.run(
                burst(
                    ingest,
                    ids,
                    sequences_of,
                    args.upload_every,
                    connections=args.connections,
                    concurrency=args.concurrency,
                )
            )

        log(f"{side.name}: a warm-up round of {len(ids)} uploads")
        one_round()
        gateway0 = gateway_histograms(metrics_port) if product else {}
        cpu0 = {k: c.cpu_seconds() for k, c in children.items()}
        hist0 = authorize_histogram(http_port)
        rounds = []
        for n in range(1, args.rounds + 1):
            log(f"{side.name}: round {n} of {args.rounds}: {len(ids)} uploads at once")
            rounds.append(one_round())
            log(f"{side.name}: round {n} took {rounds[-1].seconds:.2f}s")
        # The median round stands for the side; CPU is per round, over all of them.
        side.rounds = [r.seconds for r in rounds]
        side.burst = sorted(rounds, key=lambda r: r.seconds)[len(rounds) // 2]
        side.burst_cpu = {k: (c.cpu_seconds() - cpu0[k]) / len(rounds) for k, c in children.items()}
        side.authorize_burst = histogram_figures(hist0, authorize_histogram(http_port))
        side.load.append(load_average())
        if product:
            side.gateway_burst = gateway_figures(gateway0, gateway_histograms(metrics_port))
