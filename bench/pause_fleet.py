"""Pause-a-fleet benchmark: how fast, and at what memory cost, the product pauses N agents.

Runs the real ``killswitch serve`` and ``killswitch-agent simulate`` as separate
processes, and, in the same run and topology, a bare grpc.aio push
(``bench.bare_server`` + ``bench.bare_fleet``) with no product logic. One
harness drives both through the Operator API, so the ratios product/baseline
show what the product adds on top of what gRPC itself costs on this machine.

It prints figures, it asserts nothing. Run from the repository root::

    .venv/bin/python -m bench.pause_fleet --agents 10000 --topology both --repeat 3
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import grpc
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from bench.procs import Child, free_port, install_cleanup, stop_all

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OPERATOR_METADATA = (("x-killswitch-operator", "bench"),)
# The harness's own channel must notice a restarted server at once, not after
# gRPC's default 1 s+ reconnect backoff, or it would add that to the figures.
HARNESS_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
]
OFFLINE_STATES = frozenset({"OFFLINE_AT_RISK", "OFFLINE_LEASE_EXPIRED", "OFFLINE", "NEVER_SEEN"})
# An agent that acked its stop; the product then verifies it a heartbeat later.
STOPPED_STATES = frozenset({"STOP_REPORTED", "VERIFIED_STOPPED"})
TARGET_RATIO = 1.5
# How a table row compares product with baseline: not at all, a ratio, a ratio with a target.
Compare = Literal["", "ratio", "target"]


# ------------------------------------------------------------------ what is compared


@dataclass(frozen=True, slots=True)
class Topology:
    """How the fleet reaches the server: ``connections`` TCP links shared by all agents."""

    name: str
    connections: int


@dataclass(frozen=True, slots=True)
class System:
    """One side of the comparison: how to start its server and its fleet."""

    name: str
    product: bool
    gc_freeze: bool = False

    def server_argv(self, port: int, data_dir: Path, paused_epoch: int | None) -> list[str]:
        if self.product:  # a restart finds its state in data_dir
            return [
                str(BIN / "killswitch"), "serve", "--data-dir", str(data_dir),
                "--grpc", f"127.0.0.1:{port}", "--http", "127.0.0.1:0",
                "--log-format", "json", "--log-level", "warning",
            ]  # fmt: skip
        argv = [sys.executable, "-m", "bench.bare_server", "--port", str(port)]
        if paused_epoch is not None:  # the bare server has no store: say where it was
            argv += ["--epoch", str(paused_epoch), "--paused"]
        return [*argv, "--gc-freeze"] if self.gc_freeze else argv

    def fleet_argv(self, target: str, agents: int, connections: int) -> list[str]:
        if self.product:
            return [
                str(BIN / "killswitch-agent"), "simulate", "--server", target,
                "--agents", str(agents), "--connections", str(connections),
                "--report-every", "3600",
            ]  # fmt: skip
        return [
            sys.executable, "-m", "bench.bare_fleet", "--server", target,
            "--agents", str(agents), "--connections", str(connections),
        ]  # fmt: skip


BASELINE = System("baseline", product=False)
TUNED_BASELINE = System("baseline+gc.freeze", product=False, gc_freeze=True)
PRODUCT = System("product", product=True)


# ------------------------------------------------------------------ results


@dataclass(frozen=True, slots=True)
class Push:
    """One CreateHold(all): t0 is taken just before the call; acks are server receive times."""

    rpc: float
    polled: float
    p50: float
    p99: float
    p100: float


@dataclass(frozen=True, slots=True)
class Reconnect:
    """kill -9, restart at once; every figure counts from the kill."""

    listening: float
    connected: float
    settled: float
    reacked: float


@dataclass(slots=True)
class Run:
    system: System
    topology: Topology
    command: str = ""
    connect: float = 0.0
    rss_fresh_kib: int = 0
    rss_connected_kib: int = 0
    idle_cpu: float = 0.0
    status_ms: float = 0.0
    pushes: list[Push] = field(default_factory=list)
    reconnects: list[Reconnect] = field(default_factory=list)

    def kib_per_agent(self, agents: int) -> float:
        return (self.rss_connected_kib - self.rss_fresh_kib) / agents

    def samples(self, name: str) -> list[float]:
        """One field of every ``Push`` or every ``Reconnect`` (empty: not measured)."""
        rounds: Sequence[Push | Reconnect] = (
            self.pushes if name in Push.__dataclass_fields__ else self.reconnects
        )
        return [float(getattr(r, name)) for r in rounds]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; q=1 is the maximum."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


# ------------------------------------------------------------------ the Operator API


class Operator:
    """The harness's view of a server: the same calls for the product and the baseline."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.insecure_channel(target, options=HARNESS_CHANNEL_OPTIONS)
        self._stub = pb_grpc.OperatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def status(self) -> pb.GetStatusResponse:
        return self._stub.GetStatus(pb.GetStatusRequest(), timeout=30)

    def answers(self) -> bool:
        try:
            self._stub.GetStatus(pb.GetStatusRequest(), timeout=1)
        except grpc.RpcError:
            return False
        return True

    def create_hold(self) -> pb.CreateHoldResponse:
        request = pb.CreateHoldRequest(
            scope=pb.Scope(all=True), reason="pause_fleet benchmark", ticket="BENCH-1"
        )
        return self._stub.CreateHold(request, timeout=30, metadata=OPERATOR_METADATA)

    def lift_hold(self, hold_id: str) -> None:
        request = pb.LiftHoldRequest(hold_id=hold_id)
        self._stub.LiftHold(request, timeout=30, metadata=OPERATOR_METADATA)

    def acks(self) -> list[tuple[float, int]]:
        """(acked_at, applied epoch) per agent; acked_at 0.0 if it never acked."""
        records = self._stub.ListAgents(pb.ListAgentsRequest(), timeout=60)
        return [(r.acked_at.ToNanoseconds() / 1e9, r.applied_epoch) for r in records]


def by_state(status: pb.GetStatusResponse) -> dict[str, int]:
    return {c.state: c.count for c in status.by_state if c.count}


def all_in(state: str, agents: int) -> Callable[[pb.GetStatusResponse], bool]:
    """Every one of ``agents`` agents known, settled, and in ``state``."""

    def check(s: pb.GetStatusResponse) -> bool:
        return s.total == agents and s.settled == agents and by_state(s) == {state: agents}

    return check


def all_stopped(agents: int) -> Callable[[pb.GetStatusResponse], bool]:
    """Every one of ``agents`` agents acked the pause (reported, or already verified)."""

    def check(s: pb.GetStatusResponse) -> bool:
        counts = by_state(s)
        return s.total == agents and sum(counts.get(k, 0) for k in STOPPED_STATES) == agents

    return check


def all_connected(agents: int) -> Callable[[pb.GetStatusResponse], bool]:
    def check(s: pb.GetStatusResponse) -> bool:
        return s.total == agents and not OFFLINE_STATES & by_state(s).keys()

    return check


def poll(
    op: Operator,
    what: str,
    check: Callable[[pb.GetStatusResponse], bool],
    *,
    since: float,
    timeout: float,
    interval: float,
) -> float:
    """Poll GetStatus until ``check`` holds; seconds from ``since`` (wall clock) to that answer.

    Failed calls count as "not yet": during a reconnect storm the server answers
    some calls with CANCELLED or UNAVAILABLE, as the agents see too.
    """
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        try:
            status = op.status()
        except grpc.RpcError as exc:
            last = f"error {exc}"
        else:
            if check(status):
                return time.time() - since
            last = f"total {status.total}, settled {status.settled}, {by_state(status)}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}; last: {last}")
        time.sleep(interval)


def wait_answering(op: Operator, server: Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not op.answers():
        if not server.alive():
            raise RuntimeError(f"{server.name} exited:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{server.name} did not answer within {timeout:g}s")
        time.sleep(0.02)


# ------------------------------------------------------------------ one system, one topology


@dataclass(frozen=True, slots=True)
class Site:
    """Where one system runs: its port and files, and how to (re)start its server."""

    system: System
    slug: str
    port: int
    workdir: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_server(self, paused_epoch: int | None) -> Child:
        data_dir = self.workdir / f"{self.slug}-data"
        argv = self.system.server_argv(self.port, data_dir, paused_epoch)
        return Child(f"{self.slug} server", argv, self.workdir / f"{self.slug}-server.log", REPO)


@dataclass(slots=True)
class Bench:
    """Measures one system on one topology from a fresh server and data dir."""

    agents: int
    repeat: int
    poll_interval: float
    timeout: float
    settle: float
    restart: bool
    workdir: Path

    def run(self, system: System, topology: Topology) -> Run:
        slug = f"{system.name}-{topology.name}".replace("+", "-").replace(".", "-")
        site = Site(system, slug, free_port(), self.workdir)
        result = Run(system, topology)
        server = site.start_server(None)
        fleet: Child | None = None
        op = Operator(site.target)
        try:
            wait_answering(op, server, self.timeout)
            time.sleep(1.0)
            result.rss_fresh_kib = server.rss_kib()
            argv = system.fleet_argv(site.target, self.agents, topology.connections)
            result.command = f"{shlex.join(server.argv)}\n{shlex.join(argv)}"
            log(f"{slug}: server up ({result.rss_fresh_kib / 1024:.1f} MiB); starting the fleet")
            fleet = Child(f"{slug} fleet", argv, self.workdir / f"{slug}-fleet.log", REPO)
            result.connect = poll(
                op, "the fleet to connect and ack", all_in("CAPTURING", self.agents),
                since=time.time(), timeout=self.timeout, interval=max(0.5, self.poll_interval),
            )  # fmt: skip
            self._measure_idle(result, server, op)
            log(
                f"{slug}: {self.agents} agents connected in {result.connect:.1f}s,"
                f" {result.kib_per_agent(self.agents):.1f} KiB/agent,"
                f" idle CPU {result.idle_cpu:.0%}, GetStatus {result.status_ms:.1f} ms"
            )
            for i in range(self.repeat):
                push = self._push(op)
                result.pushes.append(push)
                log(
                    f"{slug}: push {i + 1}/{self.repeat}: p50 {push.p50:.3f}s p99 {push.p99:.3f}s"
                    f" p100 {push.p100:.3f}s polled {push.polled:.3f}s"
                )
            for i in range(self.repeat if self.restart else 0):
                server, again = self._reconnect(site, server, op)
                result.reconnects.append(again)
                log(
                    f"{slug}: restart {i + 1}/{self.repeat}: listening {again.listening:.2f}s,"
                    f" connected {again.connected:.2f}s, settled {again.settled:.2f}s,"
                    f" re-acked {again.reacked:.2f}s"
                )
            return result
        except BaseException:
            for child in (server, fleet):
                if child is not None:
                    log(f"--- last lines of {child.name} ({child.log_path}):\n{child.log_tail()}")
            raise
        finally:
            op.close()
            if fleet is not None:
                fleet.stop()
            server.stop()

    def _measure_idle(self, result: Run, server: Child, op: Operator) -> None:
        """Memory once the fleet is settled, then idle CPU and what one GetStatus costs."""
        time.sleep(self.settle)
        result.rss_connected_kib = server.rss_kib()
        cpu, start = server.cpu_seconds(), time.monotonic()
        time.sleep(self.settle)
        result.idle_cpu = (server.cpu_seconds() - cpu) / (time.monotonic() - start)
        latencies = []
        for _ in range(5):
            t = time.perf_counter()
            op.status()
            latencies.append(time.perf_counter() - t)
        result.status_ms = statistics.median(latencies) * 1000

    def _push(self, op: Operator) -> Push:
        """Pause everyone and time it; lift first if the fleet is paused from the last round."""
        held = op.status().holds
        if held:
            for hold in held:
                op.lift_hold(hold.id)
            poll(op, "the fleet to resume", all_in("CAPTURING", self.agents), since=time.time(),
                 timeout=self.timeout, interval=self.poll_interval)  # fmt: skip
            time.sleep(self.settle)
        t0 = time.time()
        response = op.create_hold()
        rpc = time.time() - t0
        paused = all_stopped(self.agents)
        polled = poll(
            op, "100% STOP_REPORTED", lambda s: s.epoch >= response.epoch and paused(s),
            since=t0, timeout=self.timeout, interval=self.poll_interval,
        )  # fmt: skip
        acks = op.acks()
        stale = sum(1 for _, epoch in acks if epoch < response.epoch)
        if len(acks) != self.agents or stale:
            raise RuntimeError(f"{len(acks)} agents listed, {stale} without an ack of the pause")
        latencies = sorted(at - t0 for at, _ in acks)
        return Push(
            rpc=rpc,
            polled=polled,
            p50=percentile(latencies, 0.50),
            p99=percentile(latencies, 0.99),
            p100=percentile(latencies, 1.0),
        )

    def _reconnect(self, site: Site, server: Child, op: Operator) -> tuple[Child, Reconnect]:
        """kill -9 the paused server, restart it on the same port and data; time the return."""
        epoch = op.status().epoch
        time.sleep(self.settle)  # let the product flush its last acks before the crash
        t_kill = time.time()
        server.kill9()
        server = site.start_server(epoch)
        wait_answering(op, server, self.timeout)
        listening = time.time() - t_kill
        every = {"since": t_kill, "timeout": self.timeout, "interval": self.poll_interval}
        connected = poll(op, "every agent to reconnect", all_connected(self.agents), **every)
        settled = poll(op, "100% STOP_REPORTED", all_stopped(self.agents), **every)
        # Every agent's new ack, from the server's own ack times.
        deadline = time.monotonic() + self.timeout
        while True:
            acks = [at for at, _ in op.acks()]
            if len(acks) == self.agents and min(acks) > t_kill:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("timed out waiting for every agent to ack after the restart")
            time.sleep(0.5)
        return server, Reconnect(listening, connected, settled, max(acks) - t_kill)


# ------------------------------------------------------------------ report


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cell(values: Sequence[float], fmt: str) -> str:
    """The median, and the range when there are several rounds."""
    if not values:
        return "-"
    text = format(statistics.median(values), fmt)
    if len(values) > 1:
        text += f" ({format(min(values), fmt)}-{format(max(values), fmt)})"
    return text


def ratio(product: Sequence[float], baseline: Sequence[float], target: bool) -> str:
    if not product or not baseline:
        return ""
    value = statistics.median(product) / statistics.median(baseline)
    if not target:
        return f"{value:.2f}x"
    return f"**{value:.2f}x** ({'met' if value <= TARGET_RATIO else 'MISSED'})"


def topology_table(here: Sequence[Run], agents: int, repeat: int) -> list[str]:
    """One markdown table: a column per system, then product/baseline ratios."""
    topology = here[0].topology
    product = next(r for r in here if r.system.product)
    bases = [r for r in here if not r.system.product]
    header = [r.system.name for r in here] + [f"product / {b.system.name}" for b in bases]
    lines = [
        f"### {topology.name}: {agents} agents over {topology.connections} connections"
        f" (median of {repeat}, range in brackets)",
        "",
        "| figure | " + " | ".join(header) + " |",
        "|---" * (1 + len(header)) + "|",
    ]

    def row(label: str, figure: Callable[[Run], list[float]], fmt: str, compare: Compare) -> None:
        cells = [cell(figure(r), fmt) for r in here]
        for base in bases:
            cells.append(
                ratio(figure(product), figure(base), compare == "target") if compare else ""
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def rounds(name: str) -> Callable[[Run], list[float]]:
        return lambda r: r.samples(name)

    row("**time to 100% STOP_REPORTED** (last ack - t0), s", rounds("p100"), ".3f", "target")
    row("ack latency p50, s", rounds("p50"), ".3f", "ratio")
    row("ack latency p99, s", rounds("p99"), ".3f", "ratio")
    row("100% seen by polling GetStatus, s", rounds("polled"), ".3f", "")
    row("CreateHold round trip, s", rounds("rpc"), ".3f", "")
    row("**server RSS per agent**, KiB", lambda r: [r.kib_per_agent(agents)], ".1f", "target")
    row("server RSS fresh, MiB", lambda r: [r.rss_fresh_kib / 1024], ".1f", "")
    row("server RSS connected, MiB", lambda r: [r.rss_connected_kib / 1024], ".1f", "")
    row("fleet connect + first ack, s", lambda r: [r.connect], ".1f", "")
    row("idle server CPU, % of a core", lambda r: [r.idle_cpu * 100], ".0f", "")
    row("GetStatus latency (idle), ms", lambda r: [r.status_ms], ".1f", "")
    row("restart: listening again, s", rounds("listening"), ".2f", "")
    row("restart: all connected, s", rounds("connected"), ".2f", "ratio")
    row("restart: 100% STOP_REPORTED, s", rounds("settled"), ".2f", "ratio")
    row("restart: every agent re-acked, s", rounds("reacked"), ".2f", "ratio")
    return [*lines, ""]


def report(runs: Sequence[Run], agents: int, repeat: int) -> str:
    lines: list[str] = []
    for topology in dict.fromkeys(r.topology for r in runs):
        lines += topology_table([r for r in runs if r.topology == topology], agents, repeat)
    commands = sorted({r.command for r in runs})
    lines += [
        "t0 is taken just before CreateHold; ack times are the server's receive times.",
        "Restarts reuse the port; the bare server, having no store, restarts with"
        " `--epoch E --paused`.",
        "",
        "Processes started (ports vary per run):",
        "",
        "```",
        *commands,
        "```",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ command line


def this_command() -> str:
    return shlex.join([os.path.relpath(sys.executable, REPO), "-m", "bench.pause_fleet",
                       *sys.argv[1:]])  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pause_fleet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--agents", type=int, default=10_000, help="N (default %(default)s)")
    parser.add_argument(
        "--topology",
        choices=["mux", "per-agent", "both"],
        default="both",
        help="mux: the simulator's 8 shared connections; per-agent: one connection per agent",
    )
    parser.add_argument("--connections", type=int, default=8, help="K for mux (default 8)")
    parser.add_argument("--repeat", type=int, default=1, help="pushes/restarts per run; medians")
    parser.add_argument("--skip-restart", action="store_true", help="no kill -9 / reconnect")
    parser.add_argument(
        "--tuned-baseline",
        action="store_true",
        help="also run the baseline with gc.freeze() before each push (the notes' tuned floor)",
    )
    parser.add_argument("--poll", type=float, default=0.05, help="GetStatus poll interval, s")
    parser.add_argument("--timeout", type=float, default=180.0, help="bound on every wait, s")
    parser.add_argument("--settle", type=float, default=3.0, help="quiet time between phases, s")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    install_cleanup()
    topologies = {
        "mux": [Topology("mux", args.connections)],
        "per-agent": [Topology("per-agent", args.agents)],
        "both": [Topology("per-agent", args.agents), Topology("mux", args.connections)],
    }[args.topology]
    systems = [BASELINE, *([TUNED_BASELINE] if args.tuned_baseline else []), PRODUCT]
    started = datetime.now(UTC)
    runs = []
    with tempfile.TemporaryDirectory(prefix="pause-fleet-") as tmp:
        bench = Bench(
            agents=args.agents,
            repeat=args.repeat,
            poll_interval=args.poll,
            timeout=args.timeout,
            settle=args.settle,
            restart=not args.skip_restart,
            workdir=Path(tmp),
        )
        try:
            for topology in topologies:
                for system in systems:
                    runs.append(bench.run(system, topology))
        finally:
            stop_all()
    print(f"command: {this_command()}")
    print(f"machine: {os.cpu_count()} cores, {os.uname().sysname} {os.uname().release}")
    print(f"date: {started:%Y-%m-%d %H:%M} UTC, grpcio {grpc.__version__}")
    print()
    print(report(runs, args.agents, args.repeat))


if __name__ == "__main__":
    main()
