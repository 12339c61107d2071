"""How many laptops one box carries, and what each one costs: the sizing benchmark.

Runs ``--agents`` agents, each on a connection of its own as laptops connect, split over
``--fleet-processes`` `killswitch-agent simulate` processes so that each stays under the
open-file limit, against ``--replicas`` `killswitch serve` replicas sharing one scratch
PostgreSQL database, all on this box (plaintext: the mTLS costs per agent are
``bench.pause_fleet --topology mtls``'s). Once the fleet is connected and settled it
measures an idle window: each replica's CPU and memory, the database's transactions and
row writes, and the bytes on the agents' connections. Then it pauses the
whole fleet on replica 0, as an incident commander would, and waits until every replica
shows every agent acked, then verified stopped.

It prints the figures per agent and what they come to for ``--project`` agents
(deploy/README.md, Sizing). It asserts nothing. From the repository root::

    .venv/bin/python -m bench.fleet_box --agents 20000 --replicas 2 --fleet-processes 2 \\
        --database postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import math
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

from bench.console import log
from bench.console import this_command
from bench.harness import Operator
from bench.harness import wait_answering
from bench.pause_fleet.conditions import all_in
from bench.pause_fleet.conditions import all_stopped
from bench.pause_fleet.conditions import all_verified
from bench.pause_fleet.conditions import poll_replicas
from bench.pause_fleet.postgres import admin_dsn
from bench.pause_fleet.postgres import check_admin_url
from bench.pause_fleet.postgres import scratch_database
from bench.pause_fleet.postgres import with_database
from bench.pause_fleet.systems import PRODUCT
from bench.pause_fleet.systems import Ports
from bench.procs import REPO
from bench.procs import Child
from bench.procs import free_port
from bench.procs import install_cleanup

# What a fleet process needs besides its agents' sockets: its log, Python, gRPC's own.
SPARE_FILES = 256
# The replica's CPU budget when idle, in cores: a replica is one Python process, so one
# core at most, and half of it is kept for a pause's fan-out or a reconnect storm.
IDLE_CPU_BUDGET = 0.5
# Replicas a fleet must be able to lose and still carry every agent (deploy/README.md).
SPARE_REPLICAS = 2


@dataclass(frozen=True, slots=True)
class Counters:
    """Every counter the box keeps, read at one moment."""

    at: float  # time.monotonic()
    replica_cpu: list[float]  # core-seconds per replica
    fleet_cpu: float  # core-seconds, all fleet processes
    transactions: int
    row_writes: int
    fleet_bytes: int  # sent and received on the agents' connections


@dataclass(frozen=True, slots=True)
class Window:
    """What the box did between two readings of its counters."""

    seconds: float
    replica_cpu: list[float]
    fleet_cpu: float
    transactions: int
    row_writes: int
    fleet_bytes: int

    @classmethod
    def between(cls, start: Counters, end: Counters) -> Window:
        return cls(
            seconds=end.at - start.at,
            replica_cpu=[b - a for a, b in zip(start.replica_cpu, end.replica_cpu, strict=True)],
            fleet_cpu=end.fleet_cpu - start.fleet_cpu,
            transactions=end.transactions - start.transactions,
            row_writes=end.row_writes - start.row_writes,
            fleet_bytes=end.fleet_bytes - start.fleet_bytes,
        )


@dataclass(frozen=True, slots=True)
class Measured:
    """Everything the report prints, per replica where there is one figure each."""

    fresh_kib: list[int]
    rss_kib: list[int]
    connected: list[float]
    idle: Window
    stopped: list[float]
    verified: list[float]
    pause: Window


class Box:
    """The replicas, the fleet and the database under measurement."""

    def __init__(
        self, servers: list[Child], fleet: list[Child], grpc_ports: list[int], database: str
    ) -> None:
        self.servers = servers
        self.fleet = fleet
        self._grpc_ports = grpc_ports
        self._admin = admin_dsn(with_database(database, "postgres"))
        self._name = urlsplit(database).path.strip("/")

    def _database_counters(self) -> tuple[int, int]:
        with psycopg.connect(self._admin, autocommit=True) as conn:
            row = conn.execute(
                "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted"
                " FROM pg_stat_database WHERE datname = %s",
                (self._name,),
            ).fetchone()
        assert row is not None, f"no statistics for database {self._name}"
        return int(row[0]), int(row[1])

    def _fleet_bytes(self) -> int:
        """Bytes the agents sent and received on their connections to the replicas, from
        the kernel's per-socket counters (``ss``): the processes' own I/O counters leave
        out sockets, and the loopback's would count the database's traffic too."""
        ports = " or ".join(f"dport = :{port}" for port in self._grpc_ports)
        listing = subprocess.run(
            ["ss", "-tin", "state", "established", f"( {ports} )"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        return sum(int(n) for n in re.findall(r"\bbytes_(?:sent|received):(\d+)", listing))

    def read(self) -> Counters:
        """Every counter now. PostgreSQL publishes a busy backend's counts within a
        second, an idle one's within ten: over a minute's window the lag is small."""
        transactions, row_writes = self._database_counters()
        return Counters(
            at=time.monotonic(),
            replica_cpu=[s.cpu_seconds() for s in self.servers],
            fleet_cpu=sum(f.cpu_seconds() for f in self.fleet),
            transactions=transactions,
            row_writes=row_writes,
            fleet_bytes=self._fleet_bytes(),
        )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    install_cleanup()
    with tempfile.TemporaryDirectory(prefix="fleet-box-") as tmp:
        workdir = Path(tmp)
        with scratch_database(args.database, "fleet_box") as database:
            measure(args, database, workdir)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_box", description=__doc__)
    parser.add_argument("--agents", type=int, default=20000)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--fleet-processes", type=int, default=2)
    parser.add_argument("--database", required=True, metavar="URL", help="PostgreSQL server")
    parser.add_argument("--settle", type=float, default=70.0, help="seconds before measuring")
    parser.add_argument("--idle", type=float, default=60.0, help="the idle window, seconds")
    parser.add_argument("--timeout", type=float, default=900.0, help="bound on every wait")
    parser.add_argument("--project", type=int, default=100000, help="the fleet to size for")
    args = parser.parse_args(argv)
    if min(args.agents, args.replicas, args.fleet_processes, args.project) < 1:
        parser.error("--agents, --replicas, --fleet-processes and --project must be >= 1")
    share = math.ceil(args.agents / args.fleet_processes)
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if share + SPARE_FILES > soft_limit:
        parser.error(
            f"{share} agents per fleet process need {share + SPARE_FILES} open files, over"
            f" the limit of {soft_limit}: raise --fleet-processes"
        )
    if (problem := check_admin_url(args.database)) is not None:
        parser.error(problem)
    return args


def measure(args: argparse.Namespace, database: str, workdir: Path) -> None:
    """Start, measure, report; the processes stop before the scratch database is dropped."""
    ports = [Ports(free_port(), free_port(), free_port(), database) for _ in range(args.replicas)]
    servers: list[Child] = []
    fleet: list[Child] = []
    ops = [Operator(f"127.0.0.1:{p.grpc}", None) for p in ports]
    try:
        for i, port in enumerate(ports):
            argv = PRODUCT.server_argv(port, workdir / f"replica-{i}", None)
            servers.append(Child(f"replica {i}", argv, workdir / f"replica-{i}.log", REPO))
        for op, server in zip(ops, servers, strict=True):
            wait_answering(op, server, args.timeout)
        time.sleep(1.0)
        fresh_kib = [s.rss_kib() for s in servers]
        targets = ",".join(f"127.0.0.1:{p.grpc}" for p in ports)
        started = time.time()
        for k in range(args.fleet_processes):
            share = args.agents // args.fleet_processes + (k < args.agents % args.fleet_processes)
            argv = PRODUCT.fleet_argv(targets, share, share, enrolling=None, data_dir=workdir)
            argv += ["--id-prefix", f"box{k}", "--seed", str(k + 1)]
            fleet.append(Child(f"fleet {k}", argv, workdir / f"fleet-{k}.log", REPO))
        connected = poll_replicas(
            ops, "the fleet to connect and ack", all_in("CAPTURING", args.agents),
            since=started, timeout=args.timeout, interval=1.0,
        )  # fmt: skip
        log(f"{args.agents} agents connected in {max(connected):.1f}s; settling {args.settle:g}s")
        box = Box(servers, fleet, [p.grpc for p in ports], database)
        time.sleep(args.settle)
        rss_kib = [s.rss_kib() for s in servers]
        start = box.read()
        time.sleep(args.idle)
        idle = Window.between(start, box.read())
        log("idle window measured; pausing the fleet on replica 0")
        before = box.read()
        t0 = time.time()
        ops[0].create_hold()
        stopped = poll_replicas(
            ops, "every agent acked", all_stopped(args.agents), since=t0,
            timeout=args.timeout, interval=0.2,
        )  # fmt: skip
        verified = poll_replicas(
            ops, "every agent verified", all_verified(args.agents), since=t0,
            timeout=args.timeout, interval=0.2,
        )  # fmt: skip
        pause = Window.between(before, box.read())
        report(args, Measured(fresh_kib, rss_kib, connected, idle, stopped, verified, pause))
    except BaseException:  # their logs go with the work dir: show why, as pause_fleet does
        for child in (*servers, *fleet):
            log(f"--- last lines of {child.name} ({child.log_path}):\n{child.log_tail()}")
        raise
    finally:
        for op in ops:
            op.close()
        for child in (*fleet, *servers):
            child.stop()


def report(args: argparse.Namespace, m: Measured) -> None:
    idle, pause = m.idle, m.pause
    n, r = args.agents, args.replicas
    served = n / r
    idle_cores = [c / idle.seconds for c in idle.replica_cpu]
    per_agent_core = sum(idle_cores) / n
    tps = idle.transactions / idle.seconds
    writes = idle.row_writes / idle.seconds
    bandwidth = idle.fleet_bytes / idle.seconds / n
    rss_per_served = [(b - a) / served for a, b in zip(m.fresh_kib, m.rss_kib, strict=True)]
    print(f"command: {this_command('bench.fleet_box')}\n")
    print(f"### {n} agents, one connection each, over {args.fleet_processes} fleet processes;")
    print(f"{r} replicas on one PostgreSQL database; all on this box\n")
    print("| figure | value |\n|---|---|")
    rows = [
        ("fleet connect + first ack, s (last replica)", f"{max(m.connected):.1f}"),
        ("replica RSS fresh / connected, MiB", _each(m.fresh_kib, m.rss_kib)),
        ("replica RSS per agent it serves (its connections and the fleet's rows), KiB",
         " / ".join(f"{k:.1f}" for k in rss_per_served)),
        ("idle CPU per replica, % of a core", " / ".join(f"{c:.0%}" for c in idle_cores)),
        ("idle CPU per 1,000 agents, % of a core", f"{per_agent_core * 1000:.2%}"),
        ("fleet processes' idle CPU, % of a core", f"{idle.fleet_cpu / idle.seconds:.0%}"),
        ("database, idle: transactions/s, row writes/s", f"{tps:.1f}, {writes:.0f}"),
        ("fleet bytes sent + received per agent, idle, B/s", f"{bandwidth:.0f}"),
        ("pause: every agent acked, s (each replica)", " / ".join(f"{s:.1f}" for s in m.stopped)),
        ("pause: every agent verified, s (each replica)",
         " / ".join(f"{s:.1f}" for s in m.verified)),
        ("pause until verified: transactions, row writes",
         f"{pause.transactions}, {pause.row_writes}"),
    ]  # fmt: skip
    for name, value in rows:
        print(f"| {name} | {value} |")
    p = args.project
    by_cpu = math.floor(IDLE_CPU_BUDGET / per_agent_core) if per_agent_core else p
    serving = math.ceil(p / min(by_cpu, p))
    print(f"\nAt {p:,} agents, from these figures:")
    print(f"- replicas: {serving} serving (at most {by_cpu:,} agents each, for an idle CPU of"
          f" {IDLE_CPU_BUDGET:.0%} of a core) + {SPARE_REPLICAS} to lose ="
          f" {serving + SPARE_REPLICAS};")  # fmt: skip
    # A replica commits its agents' rows in batches (every 250 ms) and beats on its own:
    # its transactions follow the replicas, its row writes the agents.
    total = serving + SPARE_REPLICAS
    print(f"- database: about {tps / r * total:.0f} transactions/s ({tps / r:.1f} per replica)"
          f" and {writes / n * p:,.0f} row writes/s idle; a fleet-wide pause about"
          f" {pause.row_writes / n * p:,.0f} row writes, in about"
          f" {pause.transactions / r * total:,.0f} transactions;")  # fmt: skip
    print(f"- bandwidth: about {bandwidth * p * 8 / 1e6:.1f} Mbit/s idle, all replicas together"
          " (plaintext; TLS adds its framing);")  # fmt: skip
    print(f"- memory: each replica holds the whole fleet's rows; at {p / serving:,.0f} agents"
          f" served, about {max(rss_per_served) * p / serving / 1024:,.0f} MiB per replica if"
          " the cost per agent served holds (an upper bound: it includes the rows of the"
          " agents the other replicas serve).")  # fmt: skip


def _each(fresh: list[int], connected: list[int]) -> str:
    return " / ".join(
        f"{a / 1024:.0f} -> {b / 1024:.0f}" for a, b in zip(fresh, connected, strict=True)
    )


if __name__ == "__main__":
    try:
        main()
    except (TimeoutError, KeyboardInterrupt) as exc:
        sys.exit(f"fleet_box: {exc or 'interrupted'}")
