"""Pause-a-fleet benchmark: how fast, and at what memory cost, the product pauses N agents.

Runs the real ``killswitch serve`` and ``killswitch-agent simulate`` as separate
processes, and, in the same run and topology, a bare grpc.aio push
(``bench.bare_server`` + ``bench.bare_fleet``) with no product logic. One
harness drives both through the Operator API, so the ratios product/baseline
show what the product adds on top of what gRPC itself costs on this machine.
Those two comparisons (``per-agent``, ``mux``) run the product with
``serve --insecure`` and ``simulate --insecure`` (plaintext, identities claimed
in metadata), as plaintext as the baseline.

The third comparison (``mtls``) runs the product as shipped: ``killswitch init``,
mTLS, every agent enrolled with a join token (before anything is timed; the
enrolment is timed on its own) and on its own TLS connection, against the
product ``--insecure`` with one connection per agent: the ratio is what mTLS costs.

Resuming takes two people, as in the product: ``ic-1`` requests, ``approver-1`` approves.

The product keeps its state in SQLite in a fresh data dir unless ``--database`` names a
PostgreSQL server: then every product run gets a fresh scratch database there, created
before and dropped after the run. ``--replicas N`` (N > 1 needs ``--database``) runs N
product servers on that one database, sharing one CA (mTLS) as replicas do; the fleet
is given every replica's address and each agent picks one. The pause is issued on
replica 0, and every replica's GetStatus is polled to see when it shows the whole fleet
paused, then verified. The baseline stays one bare server: the floor gRPC sets here.

It prints figures, it asserts nothing. Run from the repository root::

    .venv/bin/python -m bench.pause_fleet --agents 10000 --topology all --repeat 3
    .venv/bin/python -m bench.pause_fleet --agents 5000 --topology per-agent \\
        --database postgresql://postgres@127.0.0.1:5432/postgres --replicas 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import grpc
import psycopg
from killswitch.v1 import killswitch_pb2 as pb

from bench.people import issue_person
from bench.procs import Child, free_port, install_cleanup, stop_all
from control.client import Credentials, OperatorClient
from control.domain.identity import Role
from control.errors import KillswitchError
from control.pki import REPLICA_FILES, load_identity

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Who the harness is: on a plaintext server it claims these names (the bare server
# ignores the claim); over mTLS it presents the certificates `killswitch init` made.
INCIDENT_COMMANDER = ("ic-1", "incident-commander")
APPROVER = ("approver-1", "approver")
TOKEN_TTL_SECONDS = 3600
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
VERIFIED = "VERIFIED_STOPPED"
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
class Ports:
    """Where one server listens, and the database it keeps its state in ("": SQLite)."""

    grpc: int
    enroll: int
    http: int
    database: str = ""


@dataclass(frozen=True, slots=True)
class Storage:
    """What the product runs on: SQLite, or ``replicas`` servers on one PostgreSQL.

    ``admin_url``: the PostgreSQL server the scratch databases are created on ("": SQLite).
    """

    admin_url: str = ""
    replicas: int = 1

    def describe(self) -> str:
        if not self.admin_url:
            return "SQLite"
        servers = f"{self.replicas} replicas" if self.replicas > 1 else "1 server"
        return f"PostgreSQL, {servers}"


@dataclass(frozen=True, slots=True)
class Enrolling:
    """What an mTLS fleet needs to enrol: a join token and where to use it."""

    token: str
    enroll_target: str
    ca: Path
    state_dir: Path


@dataclass(frozen=True, slots=True)
class System:
    """One side of the comparison: how to start its server and its fleet.

    A product system is plaintext (``--insecure``) unless ``mtls``.
    """

    name: str
    product: bool
    gc_freeze: bool = False
    mtls: bool = False

    def server_argv(self, ports: Ports, data_dir: Path, paused_epoch: int | None) -> list[str]:
        if self.product:  # a restart finds its state in data_dir, or in the database
            security = ["--enroll", f"127.0.0.1:{ports.enroll}"] if self.mtls else ["--insecure"]
            database = ["--database", ports.database] if ports.database else []
            return [
                str(BIN / "killswitch"), "serve", "--data-dir", str(data_dir), *database,
                "--grpc", f"127.0.0.1:{ports.grpc}", "--http", f"127.0.0.1:{ports.http}",
                *security, "--log-format", "json", "--log-level", "warning",
            ]  # fmt: skip
        argv = [sys.executable, "-m", "bench.bare_server", "--port", str(ports.grpc)]
        if paused_epoch is not None:  # the bare server has no store: say where it was
            argv += ["--epoch", str(paused_epoch), "--paused"]
        return [*argv, "--gc-freeze"] if self.gc_freeze else argv

    def fleet_argv(
        self, target: str, agents: int, connections: int, enrolling: Enrolling | None
    ) -> list[str]:
        if self.product:
            if enrolling is not None:  # mTLS: each agent its own certificate and connection
                security = [
                    "--enroll-token", enrolling.token, "--enroll-server", enrolling.enroll_target,
                    "--ca", str(enrolling.ca), "--state-dir", str(enrolling.state_dir),
                ]  # fmt: skip
            else:
                security = ["--insecure", "--connections", str(connections)]
            return [
                str(BIN / "killswitch-agent"), "simulate", "--server", target,
                "--agents", str(agents), *security, "--report-every", "3600",
            ]  # fmt: skip
        return [
            sys.executable, "-m", "bench.bare_fleet", "--server", target,
            "--agents", str(agents), "--connections", str(connections),
        ]  # fmt: skip


BASELINE = System("baseline", product=False)
TUNED_BASELINE = System("baseline+gc.freeze", product=False, gc_freeze=True)
PRODUCT = System("product", product=True)
PRODUCT_MTLS = System("product mTLS", product=True, mtls=True)


@dataclass(frozen=True, slots=True)
class Comparison:
    """One table: ``subject`` against each of ``references``, same topology, same N."""

    name: str
    topology: Topology
    agents: int
    repeat: int
    subject: System
    references: tuple[System, ...]
    # The 1.5x target of the product over the bare baseline applies.
    target: bool

    @property
    def systems(self) -> tuple[System, ...]:
        return (*self.references, self.subject)


# ------------------------------------------------------------------ results


@dataclass(frozen=True, slots=True)
class Push:
    """One CreateHold(all): t0 is taken just before the call; acks are server receive times.

    ``verified``: the last agent's server verification time - t0 (NaN: not measured).
    With several replicas, the pause goes to replica 0 and ``polled``, the acks and
    ``verified`` are replica 0's view, which includes the agents of the other replicas.
    """

    rpc: float
    polled: float
    p50: float
    p99: float
    p100: float
    verified: float = math.nan
    # Seconds from t0 until polling GetStatus showed 100% VERIFIED_STOPPED on replica 0,
    # and until the last of the other replicas showed 100% paused / verified.
    verified_polled: float = math.nan
    polled_others: float = math.nan
    verified_polled_others: float = math.nan


@dataclass(frozen=True, slots=True)
class Reconnect:
    """kill -9, restart at once; every figure counts from the kill."""

    listening: float
    connected: float
    settled: float
    reacked: float


@dataclass(frozen=True, slots=True)
class Enrolment:
    """An mTLS fleet's enrolment, before anything else is measured.

    ``wall``: simulator start to the last agent certificate the server issued;
    ``span``: the server's first to last agent certificate; ``rss_kib``: the
    server's RSS once the simulator said every agent was enrolled.
    """

    agents: int
    wall: float
    span: float
    rss_kib: int

    @property
    def rate(self) -> float:
        """Agents enrolled per second, first to last certificate."""
        return (self.agents - 1) / self.span if self.span > 0 else math.nan


@dataclass(slots=True)
class Run:
    """One system's run; server figures are summed over the replicas, also kept apiece."""

    system: System
    topology: Topology
    agents: int
    repeat: int
    command: str = ""
    connect: float = 0.0
    fleet_rss_kib: int = 0
    status_ms: float = 0.0
    enrolment: Enrolment | None = None
    pushes: list[Push] = field(default_factory=list)
    reconnects: list[Reconnect] = field(default_factory=list)
    replica_rss_fresh_kib: list[int] = field(default_factory=list)
    replica_rss_connected_kib: list[int] = field(default_factory=list)
    replica_idle_cpu: list[float] = field(default_factory=list)
    # Agent streams each replica serves, from its /metrics (product only).
    replica_streams: list[int] = field(default_factory=list)

    @property
    def replicas(self) -> int:
        return len(self.replica_rss_fresh_kib)

    @property
    def rss_fresh_kib(self) -> int:
        return sum(self.replica_rss_fresh_kib)

    @property
    def rss_connected_kib(self) -> int:
        return sum(self.replica_rss_connected_kib)

    @property
    def idle_cpu(self) -> float:
        return sum(self.replica_idle_cpu)

    def kib_per_agent(self) -> float:
        return (self.rss_connected_kib - self.rss_fresh_kib) / self.agents

    def samples(self, name: str) -> list[float]:
        """One field of every ``Push`` or every ``Reconnect`` (empty: not measured)."""
        rounds: Sequence[Push | Reconnect] = (
            self.pushes if name in Push.__dataclass_fields__ else self.reconnects
        )
        values = [float(getattr(r, name)) for r in rounds]
        return [v for v in values if not math.isnan(v)]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; q=1 is the maximum."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


# ------------------------------------------------------------------ the Operator API


def person(target: str, name: str, role: str, identities: Path | None) -> OperatorClient:
    """One person on one channel: a certificate (mTLS) or a claimed name (plaintext)."""
    credentials = (
        Credentials(insecure_claim=f"{name}:{role}")
        if identities is None
        else Credentials(identity=load_identity(identities / name))
    )
    return OperatorClient(
        target, credentials, timeout=30, stream_timeout=60, options=HARNESS_CHANNEL_OPTIONS
    )


class Operator:
    """The harness's view of a server: the same calls for the product and the baseline.

    ``identities``: the data dir's ``identities`` folder of an mTLS server, else None.
    """

    def __init__(self, target: str, identities: Path | None) -> None:
        self._ic = person(target, *INCIDENT_COMMANDER, identities)
        self._approver = person(target, *APPROVER, identities)

    def close(self) -> None:
        self._ic.close()
        self._approver.close()

    def status(self) -> pb.GetStatusResponse:
        return self._ic.get_status(pb.GetStatusRequest())

    def answers(self) -> bool:
        try:
            self._ic.with_timeout(1).get_status(pb.GetStatusRequest())
        except KillswitchError:
            return False
        return True

    def create_hold(self) -> pb.CreateHoldResponse:
        request = pb.CreateHoldRequest(
            scope=pb.Scope(all=True), reason="pause_fleet benchmark", ticket="BENCH-1"
        )
        return self._ic.create_hold(request)

    def resume(self, hold_id: str) -> int:
        """Two people: the incident commander asks, the approver approves; the new epoch."""
        asked = self._ic.request_resume(
            pb.RequestResumeRequest(
                hold_id=hold_id, reason="pause_fleet benchmark: next round", ticket="BENCH-1"
            )
        )
        approved = self._approver.approve_resume(
            pb.DecideResumeRequest(request_id=asked.request.id, revision=asked.request.revision)
        )
        return int(approved.epoch)

    def agents(self) -> list[pb.AgentRecord]:
        return list(self._ic.list_agents(pb.ListAgentsRequest()))

    def acks(self) -> list[tuple[float, int]]:
        """(acked_at, applied epoch) per agent; acked_at 0.0 if it never acked."""
        return [(r.acked_at.ToNanoseconds() / 1e9, r.applied_epoch) for r in self.agents()]

    def agent_certificates_issued(self) -> list[float]:
        """When each agent certificate was issued (server clock), oldest first."""
        response = self._ic.with_timeout(60).list_certificates(pb.ListCertificatesRequest())
        return sorted(
            c.issued_at.ToNanoseconds() / 1e9 for c in response.certificates if c.role == "agent"
        )


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


def all_verified(agents: int) -> Callable[[pb.GetStatusResponse], bool]:
    """Every one of ``agents`` agents verified stopped by the product."""

    def check(s: pb.GetStatusResponse) -> bool:
        return s.total == agents and by_state(s) == {VERIFIED: agents}

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
        except KillswitchError as exc:
            last = f"error {exc}"
        else:
            if check(status):
                return time.time() - since
            last = f"total {status.total}, settled {status.settled}, {by_state(status)}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}; last: {last}")
        time.sleep(interval)


def poll_replicas(
    ops: Sequence[Operator],
    what: str,
    check: Callable[[pb.GetStatusResponse], bool],
    *,
    since: float,
    timeout: float,
    interval: float,
) -> list[float]:
    """``poll`` every replica at once, each on its own thread; seconds per replica."""
    if len(ops) == 1:
        return [poll(ops[0], what, check, since=since, timeout=timeout, interval=interval)]
    with ThreadPoolExecutor(len(ops)) as pool:
        futures = [
            pool.submit(poll, op, f"{what} on replica {i}", check, since=since,
                        timeout=timeout, interval=interval)
            for i, op in enumerate(ops)
        ]  # fmt: skip
        return [f.result() for f in futures]


def others(values: Sequence[float]) -> float:
    """The last of the replicas other than replica 0 (NaN: there is only replica 0)."""
    return max(values[1:]) if len(values) > 1 else math.nan


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
    """Where one system runs: its servers' ports and files, and how to (re)start them.

    Replica 0 (the only one unless the product runs on several) is the one the pause
    goes to; every replica has its own data dir (for the CA files) and ports.
    """

    system: System
    slug: str
    ports: tuple[Ports, ...]
    workdir: Path

    def target(self, replica: int = 0) -> str:
        return f"127.0.0.1:{self.ports[replica].grpc}"

    @property
    def targets(self) -> str:
        """Every replica, as the agents are given them."""
        return ",".join(self.target(i) for i in range(len(self.ports)))

    def data_dir(self, replica: int = 0) -> Path:
        return self.workdir / (f"{self.slug}-data" + (f"-{replica}" if replica else ""))

    @property
    def identities(self) -> Path | None:
        """Where the harness's people keep their own keys and certificates (mTLS only)."""
        return self.workdir / f"{self.slug}-people" if self.system.mtls else None

    def start_server(self, paused_epoch: int | None, replica: int = 0) -> Child:
        argv = self.system.server_argv(self.ports[replica], self.data_dir(replica), paused_epoch)
        name = f"{self.slug} server" + (f" {replica}" if len(self.ports) > 1 else "")
        log_name = f"{self.slug}-server" + (f"-{replica}" if replica else "") + ".log"
        return Child(name, argv, self.workdir / log_name, REPO)

    def streams(self, replica: int) -> int:
        """Agent streams the product server ``replica`` serves, from its /metrics."""
        url = f"http://127.0.0.1:{self.ports[replica].http}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith("killswitch_connected_streams "):
                return int(float(line.split()[1]))
        raise RuntimeError(f"no killswitch_connected_streams in {url}")


def issue_identity(site: Site, name: str, role: str, database: str) -> list[str]:
    """A person's own key and request, signed by the administrator: the commands run."""
    assert site.identities is not None
    return issue_person(
        BIN / "killswitch",
        site.data_dir(),
        name,
        Role(role),
        site.identities / name,
        database=database,
    )


def run_cli(argv: list[str]) -> str:
    """A `killswitch` command as an operator runs it; its stdout."""
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def log_summary(path: Path) -> str:
    """What a product server logged (at --log-level warning): count per level and event."""
    counts: Counter[str] = Counter()
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "unreadable"
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            counts["(not JSON)"] += 1
            continue
        if isinstance(entry, dict):
            counts[f"{entry.get('level', '?')} {entry.get('event', '?')}"] += 1
    return ", ".join(f"{k} x{n}" for k, n in counts.most_common()) or "empty"


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def with_database(url: str, name: str) -> str:
    """``url`` naming database ``name`` instead of the one it names."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def masked(url: str) -> str:
    """``url`` with its password, if any, hidden (it is printed with the commands)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def check_admin_url(url: str) -> str | None:
    """Why ``--database`` is unusable, in one line; None if it is usable."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        return f"--database {masked(url)!r}: expected postgresql://[USER@]HOST[:PORT][/DB]"
    try:
        with psycopg.connect(admin_dsn(url), connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except (psycopg.Error, ValueError) as exc:
        return f"--database {masked(url)}: cannot connect: {one_line(exc)}"
    return None


def admin_dsn(url: str) -> str:
    """``url``, naming the ``postgres`` database if it names none."""
    return url if urlsplit(url).path.strip("/") else with_database(url, "postgres")


@contextlib.contextmanager
def scratch_database(admin_url: str, slug: str) -> Iterator[str]:
    """A fresh, empty database on ``admin_url``'s server for one run; dropped afterwards."""
    name = f"pause_fleet_{slug.replace('-', '_')}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_dsn(admin_url), autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield with_database(admin_url, name)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass(slots=True)
class Bench:
    """Measures one system on one topology from fresh servers, data dirs and database."""

    poll_interval: float
    verify_poll: float
    timeout: float
    enrol_timeout: float
    settle: float
    restart: bool
    verify: bool
    workdir: Path
    storage: Storage = field(default_factory=Storage)

    def run(self, system: System, topology: Topology, agents: int, repeat: int) -> Run:
        slug = f"{system.name}-{topology.name}".replace("+", "-").replace(".", "-")
        slug = slug.replace(" ", "-").lower()
        if not (system.product and self.storage.admin_url):
            return self._run(system, topology, agents, repeat, slug=slug, database="")
        with scratch_database(self.storage.admin_url, slug) as database:
            log(f"{slug}: scratch database {masked(database)}")
            return self._run(system, topology, agents, repeat, slug=slug, database=database)

    def _run(
        self, system: System, topology: Topology, agents: int, repeat: int, *, slug: str,
        database: str,
    ) -> Run:  # fmt: skip
        replicas = self.storage.replicas if system.product else 1
        site = Site(
            system, slug,
            tuple(Ports(free_port(), free_port(), free_port(), database)
                  for _ in range(replicas)),
            self.workdir,
        )  # fmt: skip
        result = Run(system, topology, agents, repeat)
        commands: list[str] = []
        if system.mtls:  # as shipped: a CA and the operators' identities first
            init = [str(BIN / "killswitch"), "init", "--data-dir", str(site.data_dir())]
            init += ["--database", database] if database else []
            run_cli(init)
            commands.append(shlex.join(init))
            for name, role in (INCIDENT_COMMANDER, APPROVER):
                commands += issue_identity(site, name, role, database)
            for replica in range(1, replicas):  # as deployed: the replica files, no root key
                replica_pki = site.data_dir(replica) / "pki"
                replica_pki.mkdir(parents=True, mode=0o700)
                for file in REPLICA_FILES:
                    shutil.copy(site.data_dir() / "pki" / file, replica_pki / file)
                commands.append(
                    f"cp {site.data_dir()}/pki/{{{','.join(REPLICA_FILES)}}} {replica_pki}/"
                )
        servers: list[Child] = []
        fleet: Child | None = None
        ops: list[Operator] = []
        try:
            for replica in range(replicas):
                servers.append(site.start_server(None, replica))
                commands.append(shlex.join(servers[-1].argv))
                ops.append(Operator(site.target(replica), site.identities))
            for op, server in zip(ops, servers, strict=True):
                wait_answering(op, server, self.timeout)
            time.sleep(1.0)
            result.replica_rss_fresh_kib = [server.rss_kib() for server in servers]
            enrolling = self._enrolling(site, agents, commands)
            argv = system.fleet_argv(site.targets, agents, topology.connections, enrolling)
            shown = shlex.join(argv)
            if enrolling is not None:
                shown = shown.replace(enrolling.token, '"$TOKEN"')
            commands.append(shown)
            result.command = "\n".join(commands)
            if database:
                result.command = result.command.replace(database, masked(database))
            log(f"{slug}: {replicas} server(s) up ({result.rss_fresh_kib / 1024:.1f} MiB);"
                " starting the fleet")  # fmt: skip
            fleet = Child(f"{slug} fleet", argv, self.workdir / f"{slug}-fleet.log", REPO)
            started, enrolled_rss = time.time(), 0
            if enrolling is not None:
                self._wait_enrolled(fleet, servers, agents)
                enrolled_rss = sum(server.rss_kib() for server in servers)
            connected = poll_replicas(
                ops, "the fleet to connect and ack", all_in("CAPTURING", agents),
                since=started, timeout=self.timeout + (self.enrol_timeout if enrolling else 0),
                interval=max(0.5, self.poll_interval),
            )  # fmt: skip
            result.connect = connected[0]
            self._measure_idle(result, servers, fleet, ops[0])
            if system.product:
                result.replica_streams = [site.streams(i) for i in range(replicas)]
            if enrolling is not None:
                issued = ops[0].agent_certificates_issued()
                if len(issued) != agents:
                    raise RuntimeError(f"{len(issued)} agent certificates for {agents} agents")
                result.enrolment = Enrolment(
                    agents, issued[-1] - started, issued[-1] - issued[0], enrolled_rss
                )
                log(
                    f"{slug}: enrolled {agents} agents in {result.enrolment.wall:.1f}s"
                    f" ({result.enrolment.rate:.0f}/s first to last certificate)"
                )
            spread = f", streams per replica {result.replica_streams}" if replicas > 1 else ""
            log(
                f"{slug}: {agents} agents connected in {result.connect:.1f}s,"
                f" {result.kib_per_agent():.1f} KiB/agent,"
                f" idle CPU {result.idle_cpu:.0%}, GetStatus {result.status_ms:.1f} ms{spread}"
            )
            for i in range(repeat):
                push = self._push(ops, agents, verify=system.product and self.verify)
                result.pushes.append(push)
                elsewhere = (
                    f" (others: paused {push.polled_others:.3f}s,"
                    f" verified {push.verified_polled_others:.2f}s)" if replicas > 1 else ""
                )  # fmt: skip
                log(
                    f"{slug}: push {i + 1}/{repeat}: p50 {push.p50:.3f}s p99 {push.p99:.3f}s"
                    f" p100 {push.p100:.3f}s polled {push.polled:.3f}s"
                    f" verified {push.verified:.2f}s{elsewhere}"
                )
            for i in range(repeat if self.restart and replicas == 1 else 0):
                servers[0], again = self._reconnect(site, servers[0], ops[0], agents)
                result.reconnects.append(again)
                log(
                    f"{slug}: restart {i + 1}/{repeat}: listening {again.listening:.2f}s,"
                    f" connected {again.connected:.2f}s, settled {again.settled:.2f}s,"
                    f" re-acked {again.reacked:.2f}s"
                )
            return result
        except BaseException:
            for child in (*servers, fleet):
                if child is not None:
                    log(f"--- last lines of {child.name} ({child.log_path}):\n{child.log_tail()}")
            raise
        finally:
            for op in ops:
                op.close()
            if fleet is not None:
                fleet.stop()
            for server in servers:
                server.stop()
                if system.product:
                    log(f"{server.name}: log {log_summary(server.log_path)}")

    def _enrolling(self, site: Site, agents: int, commands: list[str]) -> Enrolling | None:
        """mTLS: a join token for the whole fleet, made as an operator makes one."""
        identities = site.identities
        if identities is None:
            return None
        create = [
            str(BIN / "killswitch"), "enroll-token", "create", "--uses", str(agents),
            "--ttl", str(TOKEN_TTL_SECONDS), "--identity", str(identities / INCIDENT_COMMANDER[0]),
            "--server", site.target(),
        ]  # fmt: skip
        token = run_cli(create).strip()
        commands.append(f"TOKEN=$({shlex.join(create)})")
        return Enrolling(
            token=token,
            enroll_target=f"127.0.0.1:{site.ports[0].enroll}",
            ca=site.data_dir() / "pki" / "ca.pem",
            state_dir=self.workdir / f"{site.slug}-agents",
        )

    def _wait_enrolled(self, fleet: Child, servers: Sequence[Child], agents: int) -> None:
        """Until the simulator says every agent has its certificate (it connects right after)."""
        deadline = time.monotonic() + self.enrol_timeout
        while True:
            text = fleet.log_path.read_text(errors="replace")
            if any(line.startswith("enrolled ") for line in text.splitlines()):
                return
            for child in (fleet, *servers):
                if not child.alive():
                    raise RuntimeError(f"{child.name} exited while enrolling {agents} agents")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{agents} agents not enrolled in {self.enrol_timeout:g}s")
            time.sleep(0.05)

    def _measure_idle(
        self, result: Run, servers: Sequence[Child], fleet: Child, op: Operator
    ) -> None:
        """Memory once the fleet is settled, then idle CPU and what one GetStatus costs."""
        time.sleep(self.settle)
        result.replica_rss_connected_kib = [server.rss_kib() for server in servers]
        result.fleet_rss_kib = fleet.rss_kib()
        cpu, start = [server.cpu_seconds() for server in servers], time.monotonic()
        time.sleep(self.settle)
        elapsed = time.monotonic() - start
        result.replica_idle_cpu = [
            (server.cpu_seconds() - before) / elapsed
            for server, before in zip(servers, cpu, strict=True)
        ]
        latencies = []
        for _ in range(5):
            t = time.perf_counter()
            op.status()
            latencies.append(time.perf_counter() - t)
        result.status_ms = statistics.median(latencies) * 1000

    def _push(self, ops: Sequence[Operator], agents: int, *, verify: bool) -> Push:
        """Pause everyone and time it; resume first if the fleet is paused from the last round.

        ``verify``: then also wait until the server has verified every agent stopped
        (a heartbeat at least one interval after its ack) and time the last one.
        The pause and resume go to replica 0; every replica is polled, each on its own
        thread, until it shows the whole fleet paused (then verified).
        """
        op = ops[0]
        held = op.status().holds
        if held:
            for hold in held:
                op.resume(hold.id)
            poll_replicas(ops, "the fleet to resume", all_in("CAPTURING", agents),
                          since=time.time(), timeout=self.timeout,
                          interval=self.poll_interval)  # fmt: skip
            time.sleep(self.settle)
        t0 = time.time()
        response = op.create_hold()
        rpc = time.time() - t0
        paused = all_stopped(agents)
        polled = poll_replicas(
            ops, "100% STOP_REPORTED", lambda s: s.epoch >= response.epoch and paused(s),
            since=t0, timeout=self.timeout, interval=self.poll_interval,
        )  # fmt: skip
        acks = op.acks()
        stale = sum(1 for _, epoch in acks if epoch < response.epoch)
        if len(acks) != agents or stale:
            raise RuntimeError(f"{len(acks)} agents listed, {stale} without an ack of the pause")
        latencies = sorted(at - t0 for at, _ in acks)
        verified = math.nan
        verified_polled = [math.nan]
        if verify:  # seconds, not milliseconds, apart: poll gently
            verified_polled = poll_replicas(
                ops, f"100% {VERIFIED}", all_verified(agents), since=t0, timeout=self.timeout,
                interval=self.verify_poll,
            )  # fmt: skip
            times = [r.verified_at.ToNanoseconds() / 1e9 for r in op.agents()]
            if len(times) != agents or min(times) < t0:
                raise RuntimeError(f"{len(times)} agents listed, not all verified since t0")
            verified = max(times) - t0
        return Push(
            rpc=rpc,
            polled=polled[0],
            p50=percentile(latencies, 0.50),
            p99=percentile(latencies, 0.99),
            p100=percentile(latencies, 1.0),
            verified=verified,
            verified_polled=verified_polled[0],
            polled_others=others(polled),
            verified_polled_others=others(verified_polled),
        )

    def _reconnect(
        self, site: Site, server: Child, op: Operator, agents: int
    ) -> tuple[Child, Reconnect]:
        """kill -9 the paused server, restart it on the same port and data; time the return."""
        epoch = op.status().epoch
        time.sleep(self.settle)  # let the product flush its last acks before the crash
        t_kill = time.time()
        server.kill9()
        server = site.start_server(epoch)
        wait_answering(op, server, self.timeout)
        listening = time.time() - t_kill
        every = {"since": t_kill, "timeout": self.timeout, "interval": self.poll_interval}
        connected = poll(op, "every agent to reconnect", all_connected(agents), **every)
        settled = poll(op, "100% STOP_REPORTED", all_stopped(agents), **every)
        # Every agent's new ack, from the server's own ack times.
        deadline = time.monotonic() + self.timeout
        while True:
            acks = [at for at, _ in op.acks()]
            if len(acks) == agents and min(acks) > t_kill:
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


def ratio(subject: Sequence[float], reference: Sequence[float], kind: str) -> str:
    """``kind``: "ratio", "bold" (a headline without a target), "target" (with the target)."""
    if not subject or not reference:
        return ""
    value = statistics.median(subject) / statistics.median(reference)
    if kind == "ratio":
        return f"{value:.2f}x"
    if kind == "bold":
        return f"**{value:.2f}x**"
    return f"**{value:.2f}x** ({'met' if value <= TARGET_RATIO else 'MISSED'})"


def heading(comparison: Comparison, here: Sequence[Run], storage: Storage) -> str:
    repeats = "/".join(dict.fromkeys(str(r.repeat) for r in here))
    rounds = f"median of {repeats}, range in brackets"
    topology = comparison.topology
    product = f"product on {storage.describe()}"
    if comparison.subject.mtls:
        return (
            f"### {comparison.name}: {comparison.agents} agents, each on its own mTLS"
            f" connection, against the product --insecure over {topology.connections}"
            f" connections; {product} ({rounds})"
        )
    return (
        f"### {comparison.name}: {comparison.agents} agents over {topology.connections}"
        f" connections; {product} ({rounds})"
    )


def comparison_table(comparison: Comparison, here: Sequence[Run], storage: Storage) -> list[str]:
    """One markdown table: a column per system, then subject/reference ratios."""
    subject = here[-1]
    references = here[:-1]
    header = [r.system.name for r in here] + [
        f"{subject.system.name} / {r.system.name}" for r in references
    ]
    lines = [
        heading(comparison, here, storage),
        "",
        "| figure | " + " | ".join(header) + " |",
        "|---" * (1 + len(header)) + "|",
    ]
    headline = "target" if comparison.target else "bold"

    def row(label: str, figure: Callable[[Run], list[float]], fmt: str, compare: Compare) -> None:
        cells = [cell(figure(r), fmt) for r in here]
        if all(c == "-" for c in cells):
            return  # measured by nobody here
        kind = headline if compare == "target" else compare
        for reference in references:
            cells.append(ratio(figure(subject), figure(reference), kind) if kind else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def rounds(name: str) -> Callable[[Run], list[float]]:
        return lambda r: r.samples(name)

    def enrolment(figure: Callable[[Enrolment], float]) -> Callable[[Run], list[float]]:
        return lambda r: [figure(r.enrolment)] if r.enrolment is not None else []

    row("**time to 100% STOP_REPORTED** (last ack - t0), s", rounds("p100"), ".3f", "target")
    row("ack latency p50, s", rounds("p50"), ".3f", "ratio")
    row("ack latency p99, s", rounds("p99"), ".3f", "ratio")
    row("100% seen by polling GetStatus, s", rounds("polled"), ".3f", "")
    row("100% seen by polling GetStatus on the other replicas (the last of them), s",
        rounds("polled_others"), ".3f", "")  # fmt: skip
    row("time to 100% VERIFIED_STOPPED (last verification - t0), s", rounds("verified"),
        ".2f", "ratio")  # fmt: skip
    row("100% VERIFIED_STOPPED seen by polling GetStatus (replica 0), s",
        rounds("verified_polled"), ".2f", "ratio")  # fmt: skip
    row("100% VERIFIED_STOPPED seen on the other replicas (the last of them), s",
        rounds("verified_polled_others"), ".2f", "")  # fmt: skip
    row("CreateHold round trip, s", rounds("rpc"), ".3f", "")
    row("**server RSS per agent**, KiB", lambda r: [r.kib_per_agent()], ".1f", "target")
    row("server RSS fresh, MiB", lambda r: [r.rss_fresh_kib / 1024], ".1f", "")
    row("server RSS enrolled, before connecting, MiB", enrolment(lambda e: e.rss_kib / 1024),
        ".1f", "")  # fmt: skip
    row("server RSS connected, MiB", lambda r: [r.rss_connected_kib / 1024], ".1f", "")
    for i in range(max(r.replicas for r in here) if storage.replicas > 1 else 0):
        row(f"replica {i}: agent streams", apiece("replica_streams", i), ".0f", "")
        row(f"replica {i}: RSS fresh, MiB", apiece("replica_rss_fresh_kib", i, 1 / 1024),
            ".1f", "")  # fmt: skip
        row(f"replica {i}: RSS connected, MiB",
            apiece("replica_rss_connected_kib", i, 1 / 1024), ".1f", "")  # fmt: skip
        row(f"replica {i}: idle CPU, % of a core", apiece("replica_idle_cpu", i, 100),
            ".0f", "")  # fmt: skip
    row("agents' process RSS connected, MiB", lambda r: [r.fleet_rss_kib / 1024], ".0f", "ratio")
    row("enrolment: simulator start to last certificate, s", enrolment(lambda e: e.wall),
        ".1f", "")  # fmt: skip
    row("enrolment rate, first to last certificate, agents/s", enrolment(lambda e: e.rate),
        ".0f", "")  # fmt: skip
    row("fleet connect + first ack (from simulator start), s", lambda r: [r.connect], ".1f", "")
    row("fleet connect + first ack after enrolment, s",
        lambda r: [r.connect - r.enrolment.wall] if r.enrolment is not None else [],
        ".1f", "")  # fmt: skip
    row("idle server CPU (all replicas), % of a core", lambda r: [r.idle_cpu * 100], ".0f", "")
    row("GetStatus latency (idle, replica 0), ms", lambda r: [r.status_ms], ".1f", "")
    row("restart: listening again, s", rounds("listening"), ".2f", "")
    row("restart: all connected, s", rounds("connected"), ".2f", "ratio")
    row("restart: 100% STOP_REPORTED, s", rounds("settled"), ".2f", "ratio")
    row("restart: every agent re-acked, s", rounds("reacked"), ".2f", "ratio")
    lines.append("")
    if comparison.subject.mtls and references:
        lines += [*mtls_cost(subject, references[0]), ""]
    return lines


def apiece(name: str, replica: int, scale: float = 1.0) -> Callable[[Run], list[float]]:
    """One replica's value of the per-replica list ``name`` of a run (none: no such replica)."""

    def figure(run: Run) -> list[float]:
        values: Sequence[float] = getattr(run, name)
        return [values[replica] * scale] if replica < len(values) else []

    return figure


def mtls_cost(mtls: Run, plain: Run) -> list[str]:
    """What mTLS adds per agent, from the medians of the table."""

    def per_agent_us(name: str) -> str:
        a, b = mtls.samples(name), plain.samples(name)
        if not a or not b:
            return "-"
        return f"{(statistics.median(a) - statistics.median(b)) / mtls.agents * 1e6:+.0f} µs"

    lines = [
        f"Per agent, mTLS changes the time to 100% STOP_REPORTED by {per_agent_us('p100')}"
        f" (p50 {per_agent_us('p50')}), server memory by"
        f" {mtls.kib_per_agent() - plain.kib_per_agent():+.1f} KiB and the agents' process"
        f" memory by {(mtls.fleet_rss_kib - plain.fleet_rss_kib) / mtls.agents:+.1f} KiB.",
    ]
    if mtls.enrolment is not None:
        e = mtls.enrolment
        lines.append(
            f"Enrolment: {e.agents} agents in {e.wall:.1f} s from the simulator's start"
            f" ({e.agents / e.wall:.0f} agents/s), {e.rate:.0f} agents/s first to last"
            f" certificate; server memory {(e.rss_kib - mtls.rss_fresh_kib) / e.agents:+.1f}"
            " KiB per enrolled agent before it connects."
        )
    return lines


def report(comparisons: Sequence[Comparison], runs: Mapping[RunKey, Run], storage: Storage) -> str:
    lines: list[str] = []
    for comparison in comparisons:
        here = [runs[run_key(s, comparison)] for s in comparison.systems]
        lines += comparison_table(comparison, here, storage)
    shown = [runs[run_key(s, c)] for c in comparisons for s in c.systems]
    commands = list(dict.fromkeys(r.command for r in shown))
    lines += [
        "t0 is taken just before CreateHold; ack and verification times are the server's.",
        "Restarts reuse the port; the bare server, having no store, restarts with"
        " `--epoch E --paused`.",
        *storage_notes(storage),
        "",
        "Processes started (ports and temporary paths vary per run):",
        "",
        "```",
        *commands,
        "```",
    ]
    return "\n".join(lines)


def storage_notes(storage: Storage) -> list[str]:
    if not storage.admin_url:
        return []
    notes = [
        f"The product ran on PostgreSQL ({masked(storage.admin_url)}): a fresh scratch"
        " database per product run, dropped after it. The baseline has no store.",
    ]
    if storage.replicas > 1:
        notes.append(
            f"{storage.replicas} product replicas shared it; the fleet was given every"
            " replica's address. The pause went to replica 0; its figures are replica 0's"
            " view of the whole fleet. Server memory and idle CPU are summed over the"
            " replicas (also shown apiece); the baseline is one bare server. No restart"
            " phase with several replicas."
        )
    return notes


# ------------------------------------------------------------------ command line

RunKey = tuple[str, Topology, int]


def run_key(system: System, comparison: Comparison) -> RunKey:
    """A run serves every comparison of the same system, topology and N."""
    return (system.name, comparison.topology, comparison.agents)


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
        choices=["per-agent", "mux", "mtls", "both", "all"],
        default="both",
        help=(
            "per-agent: one plaintext connection per agent; mux: the simulator's 8 shared"
            " connections (both against the bare baseline); mtls: the product over mTLS"
            " against the product --insecure per-agent; both: per-agent and mux; all: the three"
        ),
    )
    parser.add_argument("--connections", type=int, default=8, help="K for mux (default 8)")
    parser.add_argument("--repeat", type=int, default=1, help="pushes/restarts per run; medians")
    parser.add_argument(
        "--mtls-agents", type=int, help="N for the mtls comparison (default: --agents)"
    )
    parser.add_argument(
        "--mtls-repeat", type=int, help="--repeat for the mTLS run (default: --repeat)"
    )
    parser.add_argument("--skip-restart", action="store_true", help="no kill -9 / reconnect")
    parser.add_argument(
        "--skip-verify",
        action="store_true",
        help="do not wait for the product to verify every agent stopped after each push",
    )
    parser.add_argument(
        "--tuned-baseline",
        action="store_true",
        help="also run the baseline with gc.freeze() before each push (the notes' tuned floor)",
    )
    parser.add_argument(
        "--database",
        metavar="URL",
        default="",
        help=(
            "run the product on PostgreSQL instead of SQLite: URL of a PostgreSQL server,"
            " postgresql://[USER[:PASSWORD]@]HOST[:PORT][/DB], e.g."
            " postgresql://postgres@127.0.0.1:5432/postgres. The role must be allowed to"
            " CREATE DATABASE: every product run gets a fresh scratch database"
            " (pause_fleet_*) on that server, passed to `killswitch init`/`serve"
            " --database`, and dropped after the run. DB (default postgres) is only used"
            " to create and drop them; nothing is written to it"
        ),
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help=(
            "product servers sharing the --database (required for N > 1), the CA copied"
            " from the first; the fleet gets every address, each agent picks one; the"
            " pause goes to replica 0 and every replica is polled. N > 1 skips the"
            " restart phase (default 1)"
        ),
    )
    parser.add_argument("--poll", type=float, default=0.05, help="GetStatus poll interval, s")
    parser.add_argument(
        "--verify-poll",
        type=float,
        default=0.25,
        help="GetStatus poll interval while waiting for VERIFIED_STOPPED, s (default 0.25)",
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="bound on every wait, s")
    parser.add_argument(
        "--enrol-timeout", type=float, default=1800.0, help="bound on an mTLS fleet's enrolment, s"
    )
    parser.add_argument("--settle", type=float, default=3.0, help="quiet time between phases, s")
    return parser


def comparisons_for(args: argparse.Namespace) -> list[Comparison]:
    n, repeat = args.agents, args.repeat
    baselines = (BASELINE, *((TUNED_BASELINE,) if args.tuned_baseline else ()))
    per_agent = Comparison(
        "per-agent", Topology("per-agent", n), n, repeat, PRODUCT, baselines, target=True
    )
    mux = Comparison(
        "mux", Topology("mux", args.connections), n, repeat, PRODUCT, baselines, target=True
    )
    m = args.mtls_agents or n
    mtls = Comparison(
        "mtls", Topology("per-agent", m), m, args.mtls_repeat or repeat, PRODUCT_MTLS,
        (PRODUCT,), target=False,
    )  # fmt: skip
    return {
        "per-agent": [per_agent],
        "mux": [mux],
        "mtls": [mtls],
        "both": [per_agent, mux],
        "all": [per_agent, mtls, mux],
    }[args.topology]


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    why = ""
    if args.replicas < 1:
        why = "--replicas must be at least 1"
    elif args.replicas > 1 and not args.database:
        why = "--replicas > 1 needs --database postgresql://...: replicas share one PostgreSQL"
    elif args.database:
        why = check_admin_url(args.database) or ""
    if why:  # one line, no usage block: the mistake is in a value, not in the syntax
        print(f"{parser.prog}: error: {why}", file=sys.stderr)
        sys.exit(2)
    storage = Storage(args.database, args.replicas)
    # The product reads its database from the environment too: not here, unless asked.
    os.environ.pop("KILLSWITCH_DATABASE", None)
    install_cleanup()
    comparisons = comparisons_for(args)
    started = datetime.now(UTC)
    runs: dict[RunKey, Run] = {}
    failed: dict[RunKey, str] = {}
    with tempfile.TemporaryDirectory(prefix="pause-fleet-") as tmp:
        bench = Bench(
            poll_interval=args.poll,
            verify_poll=args.verify_poll,
            timeout=args.timeout,
            enrol_timeout=args.enrol_timeout,
            settle=args.settle,
            restart=not args.skip_restart,
            verify=not args.skip_verify,
            workdir=Path(tmp),
            storage=storage,
        )
        try:
            for comparison in comparisons:
                for system in comparison.systems:
                    key = run_key(system, comparison)
                    if key in runs or key in failed:
                        continue  # the same run serves both comparisons
                    # The subject's own repeat count (mtls may run fewer rounds).
                    repeat = comparison.repeat if system == comparison.subject else args.repeat
                    try:
                        runs[key] = bench.run(
                            system, comparison.topology, comparison.agents, repeat
                        )
                    except Exception as exc:  # report what did finish
                        log(f"{system.name} on {comparison.name} failed: {exc}")
                        failed[key] = f"{type(exc).__name__}: {exc}"
        finally:
            stop_all()
    complete = [c for c in comparisons if all(run_key(s, c) in runs for s in c.systems)]
    print(f"command: {this_command()}")
    print(f"machine: {os.cpu_count()} cores, {os.uname().sysname} {os.uname().release}")
    print(f"date: {started:%Y-%m-%d %H:%M} UTC, grpcio {grpc.__version__}")
    print(f"product store: {storage.describe()}")
    print()
    print(report(complete, runs, storage))
    for (name, topology, agents), why in failed.items():
        print(f"\nFAILED: {name}, {topology.name}, {agents} agents: {why}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
