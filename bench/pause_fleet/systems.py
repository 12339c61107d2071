"""What the pause benchmark compares: systems (product or bare baseline), topologies, tables.

A ``System`` knows how to start its server and its fleet; a ``Comparison`` is one
printed table, a subject against its references on the same topology and N.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BIN


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

    Plaintext (the product ``--insecure``) unless ``mtls``: then the product as shipped
    (``killswitch init``, agents enrol), or the bare baseline over TLS with client
    certificates made beforehand in its data dir (``bench.bare_tls``).
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
        if self.mtls:
            argv += ["--tls", str(data_dir)]
        return [*argv, "--gc-freeze"] if self.gc_freeze else argv

    def fleet_argv(
        self,
        target: str,
        agents: int,
        connections: int,
        *,
        enrolling: Enrolling | None,
        data_dir: Path,
    ) -> list[str]:
        """``enrolling``: the product's over mTLS; ``data_dir``: the server's, where a bare
        TLS fleet finds its certificates."""
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
        transport = ["--tls", str(data_dir)] if self.mtls else ["--connections", str(connections)]
        return [
            sys.executable, "-m", "bench.bare_fleet", "--server", target,
            "--agents", str(agents), *transport,
        ]  # fmt: skip


BASELINE = System("baseline", product=False)
TUNED_BASELINE = System("baseline+gc.freeze", product=False, gc_freeze=True)
BARE_TLS = System("baseline TLS", product=False, mtls=True)
PRODUCT = System("product", product=True)
PRODUCT_MTLS = System("product mTLS", product=True, mtls=True)


@dataclass(frozen=True, slots=True)
class Comparison:
    """One table: ``subject`` against each of ``references``, same topology, same N.

    The 1.5x target applies to the subject against each bare baseline among them.
    """

    name: str
    topology: Topology
    agents: int
    repeat: int
    subject: System
    references: tuple[System, ...]

    @property
    def systems(self) -> tuple[System, ...]:
        return (*self.references, self.subject)


RunKey = tuple[str, Topology, int]


def run_key(system: System, comparison: Comparison) -> RunKey:
    """A run serves every comparison of the same system, topology and N."""
    return (system.name, comparison.topology, comparison.agents)
