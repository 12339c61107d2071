"""The ingest drill benchmark: the gateway under a 10k fleet's uploads, then the drill.

Runs, as separate processes, the real ``killswitch serve --insecure`` (SQLite), the
real ``killswitch ingest --insecure``, and ``killswitch-agent simulate --insecure
--ingest`` with N agents uploading every 30 s (split over ``--fleet-processes``
simulators, 2 by default: one cannot offer 10,000 agents' upload rate), with the
drill's faults at small shares and ``--truth``. A second small simulator
(``--id-prefix probe``, no ``--ingest``) only holds leases for the probe agents the
harness uploads as.

First, before the fleet starts (the box holds the server, the sink and the probe
simulator's agents):

1. **one round at once**: one batch for each of ``--burst-agents`` agents (as many as
   the fleet by default) that only the round uploads as (the probe simulator holds
   their leases), sent as fast as the harness can; the time until the last is
   answered, after an untimed warm-up round that makes their files. The round is a
   throughput measure, so it runs where the load generator does not starve what it
   measures: until 22:50 UTC on 2026-12-04 it ran beside the 10,000-agent fleet, whose
   simulators took about 1.1 of the box's 2 cores; the same code then measured
   13.8 s and 23.7 s minutes apart (1.7x), a figure of the CPU left over, not of the
   gateway.

Then the fleet starts, and once it is steady (every agent capturing, then one full
upload interval):

2. **steady window**: batches landed per second (the sink's manifests), and the
   gateway's own authorization latency (its ``/metrics`` histogram
   ``killswitch_ingest_authorization_seconds``: upload in hand to verdict) and group
   commits, while probes time whole ``UploadBatch`` round trips (verdict and the
   sink's commit). The control server's ``AuthorizeBatches`` handling time comes from
   its own ``/metrics`` histogram.
3. **the drill** (product only): every fault strikes (SIGUSR1), the whole fleet is
   paused, and after three lease TTLs and two upload intervals the fault kind x server
   state table is read, with the sink audited for events captured after the pause and
   the truth checked (``tests.faults.checker``).

**The baseline** runs in the same invocation with the same control server, fleet,
probes and burst: only the gateway is replaced by ``bench.bare_sink`` (a grpc.aio
``UploadBatch`` that appends the batch to a file; no checks, no control plane, no
fsync). It prints figures, it asserts nothing. Run from the repository root::

    .venv/bin/python -m bench.ingest_drill --agents 10000
    .venv/bin/python -m bench.ingest_drill --agents 500 --lease-ttl 10   # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from killswitch.v1 import killswitch_pb2 as pb

from agent_stub.config import DEFAULT_LEASE_TTL_SECONDS, Tuning
from bench.bare_sink import count_records
from bench.ingest_load import (
    BurstResult,
    ProbeResult,
    burst,
    late_in_sink,
    next_sequences,
    probe,
    sink_batches,
)
from bench.pause_fleet import (
    BIN,
    INCIDENT_COMMANDER,
    REPO,
    TARGET_RATIO,
    Operator,
    by_state,
    log,
    log_summary,
    percentile,
    person,
    poll,
    wait_answering,
)
from bench.procs import Child, free_port, install_cleanup, stop_all
from bench.volume import own_volume
from tests.faults.checker import GRACE_SECONDS, Pause, check, read_truth

# The drill's faults (tests/faults/test_ingest_drill.py), as shares of the fleet.
FAULTS = {
    "silent-liar": 0.02,
    "exfiltrator": 0.02,
    "lie": 0.01,
    "ignore": 0.01,
    "stubborn": 0.01,
    "slow": 0.01,
    "offline": 0.01,
    "sleep": 0.01,
}
LIARS = frozenset({"silent-liar", "lie", "exfiltrator"})
HONEST = frozenset({"none", "slow", "offline", "sleep"})
P99_TARGET_SECONDS = 0.050
AUTHORIZE = "AuthorizeBatches"


@dataclass(slots=True)
class Side:
    """What one system (product or baseline) measured."""

    name: str
    steady_rate: float = math.nan
    expected_rate: float = math.nan
    window: float = 0.0
    probes: ProbeResult | None = None
    burst: BurstResult | None = None
    cpu: dict[str, float] = field(default_factory=dict)  # % of a core over the window
    burst_cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds over the round
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


# ------------------------------------------------------------------ processes


class Measured(Protocol):
    def cpu_seconds(self) -> float: ...
    def rss_kib(self) -> int: ...


@dataclass
class Fleet:
    """The simulated fleet over several processes: one Python process holding 10,000
    agents fills a core before it offers their upload rate (it offered 121 batches/s of
    333 at 14:41 UTC on 2026-12-03). Each process has its own id prefix, seed and truth."""

    children: list[Child]
    truths: list[Path]

    @classmethod
    def start(cls, args: argparse.Namespace, here: Path, grpc_port: int, ingest: str) -> Fleet:
        parts = args.fleet_processes
        children, truths = [], []
        for k in range(parts):
            agents = args.agents // parts + (1 if k < args.agents % parts else 0)
            truth = here / f"truth-{k}.json"
            children.append(
                Child(
                    f"fleet {k}",
                    [
                        str(BIN / "killswitch-agent"),
                        "simulate",
                        "--server",
                        f"127.0.0.1:{grpc_port}",
                        "--agents",
                        str(agents),
                        "--id-prefix",
                        f"laptop{k}",
                        "--seed",
                        str(k + 1),
                        "--insecure",
                        "--connections",
                        str(args.connections),
                        "--ingest",
                        ingest,
                        "--upload-every",
                        str(args.upload_every),
                        "--report-every",
                        "3600",
                        "--truth",
                        str(truth),
                        "--fault",
                        ",".join(f"{kind}={share}" for kind, share in FAULTS.items()),
                        "--fault-after",
                        "3600",
                        "--slow-max",
                        str(args.slow_max),
                    ],
                    here / f"fleet-{k}.log",
                    REPO,
                )
            )
            truths.append(truth)
        return cls(children, truths)

    def alive(self) -> bool:
        return all(child.alive() for child in self.children)

    def cpu_seconds(self) -> float:
        return sum(child.cpu_seconds() for child in self.children)

    def rss_kib(self) -> int:
        return sum(child.rss_kib() for child in self.children)

    def stop(self, grace: float = 5.0) -> None:
        for child in self.children:
            child.stop(grace=grace)

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(child.log_tail(lines) for child in self.children)

    def strike(self) -> None:
        """Every fault strikes now (SIGUSR1 to each process)."""
        for child in self.children:
            os.kill(child.pid, signal.SIGUSR1)

    def truth(self, *, newer_than: float = 0.0, timeout: float = 10.0) -> dict[str, Any]:
        """The processes' truth files as one: every agent, and when the faults struck
        (None until they struck everywhere)."""
        parts = [read_truth(p, newer_than=newer_than, timeout=timeout) for p in self.truths]
        struck = [part["trigger_at"] for part in parts]
        return {
            "agents": [row for part in parts for row in part["agents"]],
            "trigger_at": max(struck) if all(struck) else None,
        }


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_listening(child: Child, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not listening(port):
        if not child.alive():
            raise RuntimeError(f"{child.name} exited:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{child.name} is not listening on {port} after {timeout:g}s")
        time.sleep(0.05)


def load_average() -> str:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return f"{time.strftime('%H:%M:%S')} load {one} {five} {fifteen}"


def histogram(http_port: int, metric: str, label: str = "") -> dict[str, float]:
    """One histogram (and one label value of it) from a /metrics page: le -> count."""
    import urllib.request

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


@dataclass
class Bench:
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
        return [f"probe-{i:05d}" for i in range(self.args.probes, self.args.probes + self.burst_n)]

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
        ttl = ["--lease-ttl", str(args.lease_ttl)] if args.lease_ttl else []
        server = Child(
            "server",
            [
                str(BIN / "killswitch"),
                "serve",
                "--data-dir",
                str(here / "data"),
                "--grpc",
                f"127.0.0.1:{grpc_port}",
                "--http",
                f"127.0.0.1:{http_port}",
                "--insecure",
                "--log-format",
                "json",
                "--log-level",
                "warning",
                *ttl,
            ],
            here / "server.log",
            REPO,
        )
        op = Operator(f"127.0.0.1:{grpc_port}", None)
        wait_answering(op, server, 60)
        if product:
            sink = Child(
                "gateway",
                [
                    str(BIN / "killswitch"),
                    "ingest",
                    "--insecure",
                    "--data-dir",
                    str(sink_dir),
                    "--listen",
                    f"127.0.0.1:{sink_port}",
                    "--control",
                    f"127.0.0.1:{grpc_port}",
                    "--metrics",
                    f"127.0.0.1:{metrics_port}",
                    "--log-format",
                    "json",
                    "--log-level",
                    "warning",
                ],
                here / "gateway.log",
                REPO,
            )
        else:
            sink = Child(
                "bare sink",
                [
                    sys.executable,
                    "-m",
                    "bench.bare_sink",
                    "--port",
                    str(sink_port),
                    "--out",
                    str(sink_dir / "bare-sink.log"),
                ],
                here / "bare-sink.stdout",
                REPO,
            )
        wait_listening(sink, sink_port)
        ingest = f"127.0.0.1:{sink_port}"
        probes = Child(
            "probe agents",
            [
                str(BIN / "killswitch-agent"),
                "simulate",
                "--server",
                f"127.0.0.1:{grpc_port}",
                "--agents",
                str(args.probes + self.burst_n),
                "--id-prefix",
                "probe",
                "--insecure",
                "--connections",
                "1",
                "--upload-every",
                "3600",
                "--report-every",
                "3600",
            ],
            here / "probes.log",
            REPO,
        )
        self.wait_capturing(op, side, args.probes + self.burst_n)
        if not args.skip_burst:
            self.timed_round(
                side,
                product=product,
                ingest=ingest,
                children={"server": server, "sink": sink, "lease holders": probes},
                http_port=http_port,
                metrics_port=metrics_port,
                here=here,
            )
        fleet = Fleet.start(self.args, here, grpc_port, ingest)
        self.wait_capturing(op, side, self.n + args.probes + self.burst_n)
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
        side.probes = probe(
            ingest, self.probe_ids(), args.window, args.probe_every, args.upload_every
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
            side.drill = self.drill(op, grpc_port, fleet, here)
            side.load.append(load_average())
        for child in (probes, fleet, sink, server):
            child.stop(grace=10)
        side.logs = {
            "server": log_summary(server.log_path),
            "gateway" if product else "bare sink": log_summary(sink.log_path),
        }
        op.close()
        return side

    def wait_capturing(self, op: Operator, side: Side, agents: int) -> None:
        """Until the server counts exactly ``agents``, every one of them capturing."""
        side.load.append(load_average())
        log(f"{side.name}: waiting for {agents} agents to capture")
        took = poll(
            op,
            "every agent capturing",
            lambda s: s.total == agents and by_state(s).get("CAPTURING", 0) == agents,
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
            return burst(
                ingest,
                ids,
                sequences_of,
                args.upload_every,
                connections=args.connections,
                concurrency=args.concurrency,
            )

        log(f"{side.name}: a warm-up round of {len(ids)} uploads")
        one_round()
        log(f"{side.name}: one round of {len(ids)} uploads at once")
        gateway0 = gateway_histograms(metrics_port) if product else {}
        cpu0 = {k: c.cpu_seconds() for k, c in children.items()}
        hist0 = authorize_histogram(http_port)
        side.burst = one_round()
        side.burst_cpu = {k: c.cpu_seconds() - cpu0[k] for k, c in children.items()}
        side.authorize_burst = histogram_figures(hist0, authorize_histogram(http_port))
        side.load.append(load_average())
        if product:
            side.gateway_burst = gateway_figures(gateway0, gateway_histograms(metrics_port))
        log(f"{side.name}: burst took {side.burst.seconds:.2f}s")

    # ------------------------------------------------------------------ the drill

    def drill(self, op: Operator, grpc_port: int, fleet: Fleet, here: Path) -> list[str]:
        """The drill table and its findings."""
        args = self.args
        lease_ttl = float(args.lease_ttl or DEFAULT_LEASE_TTL_SECONDS)
        fleet.strike()  # every fault strikes now, before the pause
        deadline = time.monotonic() + 30
        while not fleet.truth(timeout=30)["trigger_at"]:
            if time.monotonic() > deadline:
                raise TimeoutError("the faults did not strike")
            time.sleep(0.5)
        ic = person(f"127.0.0.1:{grpc_port}", *INCIDENT_COMMANDER, None)
        hold = ic.create_hold(
            pb.CreateHoldRequest(scope=pb.Scope(all=True), reason="ingest drill", ticket="INC-14")
        )
        ic.close()
        committed = hold.hold.created_at.ToNanoseconds() / 1e9
        # Every lease runs out, slow agents ack, offline and sleeping ones come back
        # (two lease TTLs), and two upload rounds after all of that.
        wait = drill_wait(args)
        log(f"product: paused the fleet; the drill reads the verdicts in {wait:.0f}s")
        time.sleep(max(0.0, committed + wait - time.time()))

        if not fleet.alive():  # a fleet stopped early would leave a stale truth
            raise RuntimeError(f"the fleet exited during the drill: {fleet.log_tail(3)}")
        truth = fleet.truth(newer_than=time.time(), timeout=60)
        records: dict[str, pb.AgentRecord] = {r.agent_id: r for r in op.agents()}
        views = {a: {"state": r.state} for a, r in records.items()}
        kinds = {row["agent_id"]: row["fault"] for row in truth["agents"]}
        table: dict[str, Counter[str]] = defaultdict(Counter)
        for agent_id, kind in kinds.items():
            table[kind][records[agent_id].state if agent_id in records else "UNKNOWN"] += 1
        states = sorted({s for row in table.values() for s in row})
        lines = [
            f"| fault kind (agents) | {' | '.join(states)} |",
            "|---|" + "---|" * len(states),
        ]
        for kind in sorted(table):
            cells = " | ".join(str(table[kind].get(s, "")) for s in states)
            lines.append(f"| {kind} ({sum(table[kind].values())}) | {cells} |")

        allowance = {
            a: GRACE_SECONDS + (0.0 if k in LIARS else lease_ttl) for a, k in kinds.items()
        }
        audit = late_in_sink(here / "ingest", committed, allowance)
        liars = [a for a, k in kinds.items() if k == "silent-liar"]
        flagged = [a for a in liars if records[a].state == "VIOLATION"]
        flag_after = [records[a].since.ToNanoseconds() / 1e9 - committed for a in flagged]
        honest_flagged = [
            a for a, k in kinds.items() if k in HONEST and records[a].state == "VIOLATION"
        ]
        seen = {**truth, "agents": [r for r in truth["agents"] if r["fault"] != "exfiltrator"]}
        verdict = check(
            "drill", seen, [Pause(committed)], lease_ttl=lease_ttl, server_states=[views]
        )
        exfiltrators = [r for r in truth["agents"] if r["fault"] == "exfiltrator"]
        bound = 2 * args.upload_every + 2.0
        in_time = len(flagged) == len(liars) and max(flag_after, default=0.0) <= bound
        met = "met" if in_time else "MISSED"
        lines += [
            "",
            f"- silent liars in VIOLATION: **{len(flagged)}/{len(liars)}**; flagged"
            f" {max(flag_after, default=math.nan):.1f} s after the pause at the latest"
            f" (bound: one upload interval to their next upload after the ack + 2 s, taken"
            f" as {bound:g} s after the pause: {met})",
            f"- honest agents (none, slow, offline, sleep) in VIOLATION: **{len(honest_flagged)}**",
            f"- events in the sink: {audit.events} in {audit.batches} batches; read back and"
            f" checked event by event (received from 10 s before the pause on):"
            f" {audit.checked_batches} batches, {audit.bad_checksums} bad checksums;"
            f" **captured after the pause (+ grace {GRACE_SECONDS:g} s, + one lease TTL for"
            f" lease-honouring agents): {len(audit.late)}**",
            f"- truth checker (every kind but the exfiltrators): {verdict.row()}",
            f"- exfiltrators: {len(exfiltrators)}, still capturing by the truth:"
            f" {sum(bool(r['capturing']) for r in exfiltrators)} (uncaught by design: the"
            " residual risk)",
        ]
        return lines


# ------------------------------------------------------------------ report


def drill_wait(args: argparse.Namespace) -> float:
    """From the pause to reading the verdicts: three lease TTLs and two upload rounds."""
    return 3 * float(args.lease_ttl or DEFAULT_LEASE_TTL_SECONDS) + 2 * float(args.upload_every)


def ms(values: Sequence[float], q: float) -> str:
    return f"{1000 * percentile(sorted(values), q):.1f}" if values else "-"


def verdict(value: float) -> str:
    return f"**{value:.2f}x** ({'met' if value <= TARGET_RATIO else 'MISSED'})"


def report(args: argparse.Namespace, sides: dict[str, Side]) -> str:
    base, prod = sides.get("baseline"), sides.get("product")
    columns = [s for s in (base, prod) if s is not None]
    out = [
        f"Command: `{this_command()}`",
        "",
        f"| figure ({args.agents} agents uploading every {args.upload_every:g} s, SQLite) | "
        + " | ".join(s.name for s in columns)
        + " | product / baseline |",
        "|---|" + "---|" * (len(columns) + 1),
    ]

    def row(name: str, cells: list[str], comparison: str = "") -> None:
        out.append(f"| {name} | {' | '.join(cells)} | {comparison} |")

    row(
        f"**batches landed per second**, steady window"
        f" (offered: {args.agents / args.upload_every:.0f}/s)",
        [f"{s.steady_rate:.0f}" for s in columns],
        f"{base.steady_rate / prod.steady_rate:.2f}x (baseline / product)" if base and prod else "",
    )
    bursts = [s.burst for s in columns]
    if all(b is not None for b in bursts):
        row(
            f"**one round of uploads at once ({base.burst.sent if base and base.burst else ''}"
            " agents, one batch each): time to absorb**, s",
            [f"{s.burst.seconds:.2f}" for s in columns if s.burst],
            verdict(prod.burst.seconds / base.burst.seconds)
            if base and prod and base.burst and prod.burst
            else "",
        )
        row(
            "... batches per second in that round",
            [f"{s.burst.accepted / s.burst.seconds:.0f}" for s in columns if s.burst],
        )
        row(
            "... accepted / refused / errors (retried under the gateway's number)",
            [
                f"{s.burst.accepted} / {s.burst.refused} / {s.burst.errors} ({s.burst.retried})"
                for s in columns
                if s.burst
            ],
        )
    if prod and prod.gateway_steady:
        for phase, figures in (
            ("steady window", prod.gateway_steady),
            ("the round", prod.gateway_burst),
        ):
            a = figures.get("authorization_seconds", {})
            if not a.get("calls"):
                continue
            met = "met" if a["p99"] <= P99_TARGET_SECONDS else "MISSED"
            row(
                f"**authorization latency p50 / p99, {phase}** (the gateway's own histogram:"
                " upload in hand to verdict; bucket upper bounds), ms",
                [
                    *(["-"] if base else []),
                    f"<= {1000 * a['p50']:g} / <= {1000 * a['p99']:g}"
                    f" (n={a['calls']:.0f}, {100 * a['within_50ms']:.1f}% within 50 ms)",
                ],
                f"p99 {met} (target {1000 * P99_TARGET_SECONDS:.0f} ms)"
                if phase == "steady window"
                else "",
            )
            c, g = figures.get("commit_seconds", {}), figures.get("commit_batches", {})
            if c.get("calls"):
                row(
                    f"... sink group commits, {phase}: commits, p50 / p99 duration (ms),"
                    " p50 / p99 batches per commit",
                    [
                        *(["-"] if base else []),
                        f"{c['calls']:.0f}, <= {1000 * c['p50']:g} /"
                        f" <= {1000 * c['p99']:g}, <= {g['p50']:g} / <= {g['p99']:g}",
                    ],
                )
    lat = [s.probes.latencies if s.probes else [] for s in columns]
    row(
        f"UploadBatch round trip p50 / p99 ({args.probes} probes, every"
        f" {args.probe_every:g} s; includes the sink's commit), ms",
        [f"{ms(v, 0.5)} / {ms(v, 0.99)} (n={len(v)})" for v in lat],
    )
    row(
        "... probe batches refused / failed",
        [
            f"{sum(s.probes.refused.values())} / {sum(s.probes.errors.values())}"
            if s.probes
            else "-"
            for s in columns
        ],
    )
    if prod and prod.authorize.get("calls"):
        a = prod.authorize
        out.append(
            "| control server's AuthorizeBatches handling (its /metrics histogram, steady window):"
            " calls, within 50 ms, p50 / p99 (bucket bound), ms | "
            + ("- | " if base else "")
            + f"{a['calls']:.0f}, {100 * a['within_50ms']:.1f}%,"
            + f" <= {1000 * a['p50']:g} / <= {1000 * a['p99']:g} | |"
        )
    for who in ("server", "sink", "fleet"):
        cells = [f"{s.cpu.get(who, math.nan):.0f}" for s in columns]
        row(f"{who} CPU in the steady window, % of a core", cells)
    for who in ("server", "sink", "lease holders"):
        cells = [f"{s.burst_cpu.get(who, math.nan):.2f}" for s in columns]
        row(f"{who} CPU over the round, s", cells)
    if prod and prod.authorize_burst.get("calls") and prod.burst:
        calls = prod.authorize_burst["calls"]
        row(
            "control server's AuthorizeBatches calls over the round (the round's uploads per call)",
            [*(["-"] if base else []), f"{calls:.0f} ({prod.burst.sent / calls:.1f})"],
        )
    row("sink RSS, MiB", [f"{s.rss_mib.get('sink', math.nan):.0f}" for s in columns])
    out += ["", "The sink's files sat on: "]
    out += [f"- {s.name}: {s.sink_volume}" for s in columns]
    out += ["", "Machine load (1/5/15 min) at each phase: "]
    out += [f"- {s.name}: " + "; ".join(s.load) for s in columns]
    out += ["", "Logs (level event x count): "]
    out += [f"- {s.name} {k}: {v}" for s in columns for k, v in s.logs.items()]
    if prod and prod.drill:
        out += [
            "",
            "DRILL: fault kind x server state (agents), read "
            f"{drill_wait(args):g} s after the pause",
            "",
        ]
        out += prod.drill
    return "\n".join(out)


def this_command() -> str:
    return shlex.join(
        [os.path.relpath(sys.executable, REPO), "-m", "bench.ingest_drill", *sys.argv[1:]]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest_drill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--agents", type=int, default=10_000)
    upload_every = Tuning().upload_every
    parser.add_argument(
        "--upload-every",
        type=float,
        default=upload_every,
        help=f"seconds (default {upload_every:g})",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=8,
        help="shared connections of the fleet, and of the burst (default 8)",
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=None,
        help="the server's lease TTL (default: the product's, 60 s); the drill waits 3 of them",
    )
    parser.add_argument(
        "--slow-max",
        type=float,
        default=10.0,
        help="slow agents act on a directive within this (default 10 s)",
    )
    parser.add_argument("--window", type=float, default=30.0, help="steady window, s (default 30)")
    parser.add_argument("--probes", type=int, default=8, help="probe agents (default 8)")
    parser.add_argument(
        "--probe-every",
        type=float,
        default=2.0,
        help="seconds between a probe's uploads (default 2: above the verdict cache's 1 s)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=256, help="uploads in flight in the burst (default 256)"
    )
    parser.add_argument(
        "--fleet-processes",
        type=int,
        default=2,
        help="simulator processes sharing the fleet (default 2)",
    )
    parser.add_argument(
        "--burst-agents",
        type=int,
        default=0,
        help="agents the round uploads as, held by the probe simulator (default: --agents)",
    )
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-burst", action="store_true")
    parser.add_argument("--skip-drill", action="store_true", help="no pause")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    install_cleanup()
    root = Path(tempfile.mkdtemp(prefix="ingest_drill_"))
    log(f"working in {root}; {load_average()}")
    bench = Bench(args, root)
    failure = ""
    try:
        if not args.skip_baseline:
            bench.run(product=False)
        bench.run(product=True)
    except (RuntimeError, TimeoutError, AssertionError) as exc:
        failure = " ".join(str(exc).split())
        log(f"FAILED: {failure}")
    finally:
        stop_all()
        bench.volumes.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(report(args, bench.sides))
    if failure:
        print(f"\nFAILED (figures above are the runs that completed): {failure}")
    if args.keep:
        print(f"\n(working directory kept: {root})")


if __name__ == "__main__":
    main()
