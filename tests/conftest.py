"""Fixtures that run the real thing: server and simulator subprocesses, CLI as a user runs it.

A test that needs no process of its own for the server runs it in the test process
instead (``start_in_process_server``), from the same `serve` arguments."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from typing import NoReturn

import psycopg
import pytest
from hypothesis import settings

from control.pki_files import make_private_dir
from tests.inprocess import run_killswitch

# The backend fixture (SQLite and PostgreSQL) for every module that takes a store.
pytest_plugins = ["tests.store_contract"]

BIN = Path(sys.executable).parent

# The role each of the fixtures' people asks for, by the name's stem (`ic-1` -> `ic`).
PEOPLE_ROLES = {
    "ic": "incident-commander",
    "approver": "approver",
    "sre": "sre",
    "automation": "automation",
    "employee": "employee",
    "ingest": "ingest",
}
# Hypothesis: `small` by default (`make test`, CI), HYPOTHESIS_PROFILE=large for a deep run.
# In-process properties take max_examples; those over real gRPC a share of it
# (tests/malformed/test_fuzzing.examples).
settings.register_profile("small", max_examples=100)
settings.register_profile("large", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or "small")
STARTUP_TIMEOUT = 20.0
ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
# Short intervals keep the tests fast; verification needs one heartbeat after the ack.
FAST_TIMINGS = ["--heartbeat", "0.5", "--lease-ttl", "5"]


def missing_tool(why: str) -> NoReturn:
    """Skip a test whose tool is missing, but fail under CI=true, where `make test` installs
    every tool: CI must never pass by skipping."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}; CI=true, so this is an error, not a skip")
    pytest.skip(why)


def person_role(name: str) -> str:
    """The role the fixtures' person ``name`` has: ``ic-1`` is an incident commander."""
    return PEOPLE_ROLES[name.rsplit("-", 1)[0]]


# Ports handed to servers come from a range of this worker's own, below the kernel's
# ephemeral range (32768 and up on Linux): no client connection is given one of them
# between our check and the server's bind, and two pytest-xdist workers never pick the
# same one. Servers that restart keep their ports, so a port is never handed out twice.
PORTS_PER_WORKER = 2_000
FIRST_PORT = 12_000


def _worker_index() -> int:
    """0 without pytest-xdist, N for its worker ``gwN``."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker.removeprefix("gw"))


_next_ports = iter(
    range(
        FIRST_PORT + _worker_index() * PORTS_PER_WORKER,
        FIRST_PORT + (_worker_index() + 1) * PORTS_PER_WORKER,
    )
)


def free_port() -> int:
    """A loopback port nothing listens on, never handed out before in this session."""
    for port in _next_ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken by something else on the machine
            return port
    raise RuntimeError(f"this worker's {PORTS_PER_WORKER} ports are used up")


# wait_for asks every 0.1 s at first, then less often, up to every 0.3 s: most predicates are
# a CLI call to a server (5 ms of CPU on each side), and the suite waits so much that asking
# every 0.1 s throughout took a tenth of the box's CPU.
FIRST_POLL_SECONDS = 0.1
POLL_GROWTH = 1.25
LAST_POLL_SECONDS = 0.3


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    interval = FIRST_POLL_SECONDS
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
        interval = min(interval * POLL_GROWTH, LAST_POLL_SECONDS)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def killswitch(args: list[str]) -> None:
    """`killswitch *args`, which must succeed."""
    done = run_killswitch([str(BIN / "killswitch"), *args], {}, timeout=60)
    assert done.returncode == 0, f"{args}: {done.stderr}"


@functools.cache
def initialised() -> Path:
    """The data dir of the session's one `killswitch init`, which every secure server without
    a database of its own starts from a copy of (an init per server took 1-2 s, 70+ times).

    So those servers share their CAs and keys, as replicas do; no test tells them apart.
    A test of `init` runs it, and a test that needs a CA of its own makes one
    (``control.pki.initialise``). ``shutil.copy2`` keeps the 0600 of every key file and
    ``copytree`` the 0700 of every directory.
    """
    root = Path(tempfile.mkdtemp(prefix="killswitch-init-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    killswitch(["init", "--data-dir", str(root / "data")])
    return root / "data"


class ServerProcess:
    """`killswitch serve` in a subprocess, on free loopback ports and a temp data dir.

    Secure (mTLS) unless ``--insecure`` is among the extra arguments, exactly as shipped:
    the first start runs `killswitch init`, which creates the CAs and the admin identity.
    People get their identities as a real person would (``identity``): their own key
    in their own directory, outside the data dir, signed with the root key.
    A replica (``replica_of``) shares the first server's people and root key holder.
    """

    def __init__(
        self, data_dir: Path, extra_args: list[str], *, first: ServerProcess | None = None
    ) -> None:
        self.data_dir = data_dir
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.enroll_port = free_port()
        self.address = f"127.0.0.1:{self.grpc_port}"
        self.enroll_address = f"127.0.0.1:{self.enroll_port}"
        self.extra_args = extra_args
        self.secure = "--insecure" not in extra_args
        self.log_path = data_dir.parent / f"server-{self.grpc_port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # Where the root key is (the administrator's side), and where people keep theirs.
        self.root_dir: Path = first.root_dir if first else data_dir
        self.people: Path = first.people if first else data_dir.parent / f"people-{data_dir.name}"

    @property
    def ca_path(self) -> Path:
        return self.data_dir / "pki" / "ca.pem"

    @property
    def database_args(self) -> list[str]:
        if "--database" not in self.extra_args:
            return []
        at = self.extra_args.index("--database")
        return self.extra_args[at : at + 2]

    def identity(self, name: str) -> Path:
        """The identity directory of ``name``, issued on first use as a person gets one;
        `admin` is the one `killswitch init` made."""
        if name == "admin":
            return self.root_dir / "identities" / "admin"
        directory = self.people / name
        if not (directory / "cert.pem").exists():
            self.issue(name, person_role(name), directory)
        return directory

    def issue(self, name: str, role: str, directory: Path) -> Path:
        """`identity request` by the person, `certs issue` by the administrator."""
        request = ["identity", "request", "--name", name, "--role", role, "--out", str(directory)]
        issue = ["certs", "issue", str(directory / "request.csr"), "--role", role]
        issue += ["--data-dir", str(self.root_dir), "--out", str(directory / "cert.pem")]
        killswitch(request)
        killswitch([*issue, *self.database_args])
        shutil.copy(self.root_dir / "pki" / "ca.pem", directory / "ca.pem")
        return directory

    def serve_args(self) -> list[str]:
        """What follows `killswitch serve`: this server's ports, data dir and timings."""
        return [
            "--data-dir",
            str(self.data_dir),
            "--grpc",
            self.address,
            "--http",
            f"127.0.0.1:{self.http_port}",
            "--enroll",
            self.enroll_address,
            "--log-format",
            "json",
            *FAST_TIMINGS,
            *self.extra_args,
        ]

    def start(self) -> None:
        if self.secure and not self.ca_path.exists():
            self.initialise()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "killswitch"), "serve", *self.serve_args()],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self.ready, STARTUP_TIMEOUT, "server readiness")

    def initialise(self) -> None:
        """What `killswitch init` makes: a copy of the session's one (``initialised``), or,
        when the server has a database of its own, `init` itself: the certificates are
        recorded in the database the server will use."""
        if self.database_args:
            killswitch(["init", "--data-dir", str(self.data_dir), *self.database_args])
            return
        make_private_dir(self.data_dir)
        for entry in initialised().iterdir():
            copy = shutil.copytree if entry.is_dir() else shutil.copy2
            copy(entry, self.data_dir / entry.name)

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}: {self.log()}")
        return self.answers_ready()

    def answers_ready(self) -> bool:
        """Whether /readyz says 200, as a load balancer would ask."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}/readyz", timeout=1
            ) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@contextlib.contextmanager
def module_server(
    tmp_path_factory: pytest.TempPathFactory, name: str, *extra_args: str
) -> Iterator[ServerProcess]:
    """A server for every test of one module (a module-scoped fixture's body), stopped after
    them. Mark the module ``xdist_group`` too, or each worker builds one of its own."""
    server = ServerProcess(tmp_path_factory.mktemp(name) / "data", list(extra_args))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def replica_of(first: ServerProcess, data_dir: Path, extra_args: list[str]) -> ServerProcess:
    """Another replica of ``first``'s fleet: the files a replica needs, not the root key."""
    from control.pki import REPLICA_FILES

    (data_dir / "pki").mkdir(parents=True, mode=0o700)
    for name in REPLICA_FILES:
        shutil.copy(first.data_dir / "pki" / name, data_dir / "pki" / name)
    return ServerProcess(data_dir, extra_args, first=first)


def agent_identity(server: ServerProcess, agent_id: str, where: Path) -> Path:
    """An agent certificate straight from the agent CA, as enrolment would give it."""
    from control.domain.identity import Role
    from control.pki import Authority
    from control.pki import request_identity

    directory = where / agent_id
    csr = request_identity(directory, agent_id, Role.AGENT)
    authority = Authority.load(server.data_dir)
    cert, _ = authority.sign_agent_csr(csr, agent_id, now=time.time())
    (directory / "cert.pem").write_bytes(cert)
    (directory / "ca.pem").write_bytes(authority.ca_pem)
    return directory


class Cli:
    """Runs `killswitch` as an operator would, against one server, as one identity: in the
    test process, with what a subprocess would give (``tests.inprocess``)."""

    def __init__(self, server: ServerProcess, identity: str = "ic-1") -> None:
        self.server = server
        self.identity = identity

    def as_(self, identity: str) -> Cli:
        """The same server, another person (issued on first use: ``ServerProcess.identity``)."""
        return Cli(self.server, identity)

    def run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        env = {
            "KILLSWITCH_SERVER": self.server.address,
            "KILLSWITCH_IDENTITY": str(self.server.identity(self.identity)),
        }
        return run_killswitch([str(BIN / "killswitch"), *args], env, timeout)

    def ok(self, *args: str, timeout: float = 60.0) -> str:
        result = self.run(*args, timeout=timeout)
        assert result.returncode == 0, (
            f"{args} exited {result.returncode}: {result.stderr}{result.stdout}"
        )
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def agents(self, *args: str) -> dict[str, dict[str, Any]]:
        return {a["agent_id"]: a for a in self.json("agents", *args)}

    def pause(self, *args: str) -> str:
        """Pause and return the new hold id."""
        out = self.ok("pause", *args)
        return out.split()[1]

    def resume(self, hold_id: str, *args: str, approver: str = "approver-1") -> str:
        """Two people: this identity asks, ``approver`` approves. Returns the request id."""
        out = self.ok("resume", "--hold", hold_id, "--reason", "all clear", *args)
        request_id = out.split()[2]
        self.as_(approver).ok("approve", request_id)
        return request_id

    def enroll_token(self, uses: int) -> str:
        return self.ok("enroll-token", "create", "--uses", str(uses), "--ttl", "600").strip()


class Simulator:
    """`killswitch-agent simulate` in a subprocess."""

    def __init__(self, server: ServerProcess, agents: int, extra: list[str]) -> None:
        self.log_path = server.data_dir.parent / f"simulator-{server.grpc_port}-{agents}.log"
        # Each agent enrols once with a join token, then connects with its own certificate.
        # The state dir belongs to the server's data dir, so a restarted simulator reuses it.
        security = (
            [
                "--enroll-token",
                Cli(server).enroll_token(agents),
                "--enroll-server",
                server.enroll_address,
                "--ca",
                str(server.ca_path),
                "--state-dir",
                str(server.data_dir.parent / f"agents-of-{server.data_dir.name}"),
            ]
            if server.secure
            else ["--insecure", "--connections", "4"]
        )
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(BIN / "killswitch-agent"),
                    "simulate",
                    "--server",
                    server.address,
                    "--agents",
                    str(agents),
                    "--report-every",
                    "3600",
                    *security,
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        terminate(self.proc)


# What the start_server and simulate fixtures hand a test, named for its signature.
StartServer = Callable[..., ServerProcess]
Simulate = Callable[..., Simulator]


def _servers(
    kind: Callable[[Path, list[str]], ServerProcess], tmp_path: Path
) -> Iterator[Callable[..., ServerProcess]]:
    """A fixture's ``start(*extra_args)``: one more server of ``kind``; all stop after."""
    servers: list[ServerProcess] = []

    def start(*extra_args: str) -> ServerProcess:
        server = kind(tmp_path / f"data-{len(servers)}", list(extra_args))
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    yield from _servers(ServerProcess, tmp_path)


@pytest.fixture
def start_in_process_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """As ``start_server``, but each server runs in this process (``tests.inprocess_server``)."""
    from tests.inprocess_server import InProcessServer

    yield from _servers(InProcessServer, tmp_path)


@pytest.fixture
def server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server()


@pytest.fixture
def cli(server: ServerProcess) -> Cli:
    return Cli(server)


@pytest.fixture
def simulate() -> Iterator[Callable[..., Simulator]]:
    sims: list[Simulator] = []

    def start(server: ServerProcess, agents: int, *extra: str) -> Simulator:
        sim = Simulator(server, agents, list(extra))
        sims.append(sim)
        return sim

    yield start
    for sim in sims:
        sim.stop()


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """A fresh, empty database, dropped afterwards."""
    name = f"killswitch_test_{secrets.token_hex(4)}"
    try:
        admin = psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        missing_tool(f"PostgreSQL on 127.0.0.1:5432 is unreachable: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        # A new connection: a fault test may have restarted PostgreSQL meanwhile.
        with psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=10) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def connected_streams(server: ServerProcess) -> int:
    """Live agent streams on this server (only its own, with several replicas)."""
    url = f"http://127.0.0.1:{server.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    (line,) = [x for x in text.splitlines() if x.startswith("killswitch_connected_streams ")]
    return int(float(line.split()[1]))


def wait_capturing(cli: Cli, count: int, timeout: float = 30.0) -> None:
    """Wait until `count` agents are connected and acked the initial ALLOWED directive."""

    def capturing() -> bool:
        return int(cli.json("status")["agents"]["by_state"].get("CAPTURING", 0)) >= count

    wait_for(capturing, timeout, f"{count} capturing agents")
