"""One system on one topology, from fresh servers, data dirs and database, to a ``Run``.

``Bench`` owns the processes: it sets the site up as an operator would, starts the
servers and the fleet, hands them to the timed phases (``bench.pause_fleet.phases``),
and always stops them, printing the last lines of any that failed.
"""

from __future__ import annotations

import shlex
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from bench.bare_fleet import agent_name
from bench.bare_tls import make_certificates
from bench.console import log
from bench.harness import APPROVER
from bench.harness import INCIDENT_COMMANDER
from bench.harness import Operator
from bench.harness import wait_answering
from bench.pause_fleet import phases
from bench.pause_fleet.conditions import all_in
from bench.pause_fleet.conditions import poll_replicas
from bench.pause_fleet.phases import Pace
from bench.pause_fleet.postgres import masked
from bench.pause_fleet.postgres import scratch_database
from bench.pause_fleet.results import Enrolment
from bench.pause_fleet.results import Run
from bench.pause_fleet.site import Site
from bench.pause_fleet.site import issue_identity
from bench.pause_fleet.site import run_cli
from bench.pause_fleet.systems import Enrolling
from bench.pause_fleet.systems import Ports
from bench.pause_fleet.systems import Storage
from bench.pause_fleet.systems import System
from bench.pause_fleet.systems import Topology
from bench.procs import BIN
from bench.procs import REPO
from bench.procs import Child
from bench.procs import free_port
from bench.procs import log_summary
from control.domain.identity import Role
from control.pki import REPLICA_FILES

TOKEN_TTL_SECONDS = 3600


@dataclass(slots=True)
class Bench:
    """Measures one system on one topology from fresh servers, data dirs and database."""

    pace: Pace
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
        if system.mtls and system.product:  # as shipped: a CA and the operators' identities
            self._install_pki(site, database, commands)
        elif system.mtls:
            self._make_bare_certificates(site, result, commands)
        servers: list[Child] = []
        fleet: Child | None = None
        ops: list[Operator] = []
        try:
            for replica in range(replicas):
                servers.append(site.start_server(None, replica))
                commands.append(shlex.join(servers[-1].argv))
                ops.append(Operator(site.target(replica), site.identities))
            for op, server in zip(ops, servers, strict=True):
                wait_answering(op, server, self.pace.timeout)
            time.sleep(1.0)
            result.replica_rss_fresh_kib = [server.rss_kib() for server in servers]
            enrolling = self._enrolling(site, agents, commands)
            argv = system.fleet_argv(
                site.targets, agents, topology.connections,
                enrolling=enrolling, data_dir=site.data_dir(),
            )  # fmt: skip
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
                since=started,
                timeout=self.pace.timeout + (self.pace.enrol_timeout if enrolling else 0),
                interval=max(0.5, self.pace.poll_interval),
            )  # fmt: skip
            result.connect = connected[0]
            phases.measure_idle(result, servers, fleet, ops[0], self.pace)
            if system.product:
                result.replica_streams = [site.streams(i) for i in range(replicas)]
            if enrolling is not None:
                self._record_enrolment(result, ops[0], started, enrolled_rss, slug)
            spread = f", streams per replica {result.replica_streams}" if replicas > 1 else ""
            log(
                f"{slug}: {agents} agents connected in {result.connect:.1f}s,"
                f" {result.kib_per_agent():.1f} KiB/agent,"
                f" idle CPU {result.idle_cpu:.0%}, GetStatus {result.status_ms:.1f} ms{spread}"
            )
            self._pushes(result, ops, slug, verify=system.product and self.verify)
            if self.restart and replicas == 1:
                self._restarts(result, site, servers, ops[0], slug)
            if not system.product and not system.mtls:
                fleet.stop()  # the timed pair's part is done
                for server in servers:
                    server.stop()
                result.answering_idle_cpu = phases.measure_answering_idle(
                    system,
                    self.workdir,
                    slug,
                    agents=agents,
                    connections=topology.connections,
                    pace=self.pace,
                )
                log(f"{slug}: idle CPU answering heartbeats and leases"
                    f" {result.answering_idle_cpu:.0%}")  # fmt: skip
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

    def _install_pki(self, site: Site, database: str, commands: list[str]) -> None:
        """``killswitch init``, the harness's people, and each replica's copy of the CA."""
        init = [str(BIN / "killswitch"), "init", "--data-dir", str(site.data_dir())]
        init += ["--database", database] if database else []
        run_cli(init)
        commands.append(shlex.join(init))
        for name, role in (INCIDENT_COMMANDER, APPROVER):
            commands += issue_identity(site, name, role, database)
        for replica in range(1, len(site.ports)):  # as deployed: the replica files, no root key
            replica_pki = site.data_dir(replica) / "pki"
            replica_pki.mkdir(parents=True, mode=0o700)
            for file in REPLICA_FILES:
                shutil.copy(site.data_dir() / "pki" / file, replica_pki / file)
            commands.append(
                f"cp {site.data_dir()}/pki/{{{','.join(REPLICA_FILES)}}} {replica_pki}/"
            )

    @staticmethod
    def _make_bare_certificates(site: Site, result: Run, commands: list[str]) -> None:
        """The bare TLS baseline's CA, server certificate, people's and agents' certificates,
        in its data dir before its server starts: it has no enrolment."""
        assert site.identities is not None
        people = {name: Role(role) for name, role in (INCIDENT_COMMANDER, APPROVER)}
        started = time.perf_counter()
        agent_ids = [agent_name(i) for i in range(result.agents)]
        make_certificates(site.data_dir(), agent_ids, people, site.identities)
        result.certificates_made = time.perf_counter() - started
        commands.append(
            f"# in the harness: bench.bare_tls.make_certificates({site.data_dir()},"
            f" {result.agents} agents, people in {site.identities})"
        )
        log(f"{site.slug}: {result.agents} agent certificates made in"
            f" {result.certificates_made:.1f}s")  # fmt: skip

    def _enrolling(self, site: Site, agents: int, commands: list[str]) -> Enrolling | None:
        """The product over mTLS: a join token for the whole fleet, made as an operator
        makes one. Nothing for plaintext, nor for the bare TLS fleet (certificates made)."""
        identities = site.identities
        if identities is None or not site.system.product:
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
        deadline = time.monotonic() + self.pace.enrol_timeout
        while True:
            text = fleet.log_path.read_text(errors="replace")
            if any(line.startswith("enrolled ") for line in text.splitlines()):
                return
            for child in (fleet, *servers):
                if not child.alive():
                    raise RuntimeError(f"{child.name} exited while enrolling {agents} agents")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{agents} agents not enrolled in {self.pace.enrol_timeout:g}s")
            time.sleep(0.05)

    @staticmethod
    def _record_enrolment(
        result: Run, op: Operator, started: float, enrolled_rss: int, slug: str
    ) -> None:
        """The enrolment's figures, from the certificates the server issued."""
        agents = result.agents
        issued = op.agent_certificates_issued()
        if len(issued) != agents:
            raise RuntimeError(f"{len(issued)} agent certificates for {agents} agents")
        result.enrolment = Enrolment(
            agents, issued[-1] - started, issued[-1] - issued[0], enrolled_rss
        )
        log(
            f"{slug}: enrolled {agents} agents in {result.enrolment.wall:.1f}s"
            f" ({result.enrolment.rate:.0f}/s first to last certificate)"
        )

    def _pushes(self, result: Run, ops: Sequence[Operator], slug: str, *, verify: bool) -> None:
        """``repeat`` pauses of the whole fleet, each after resuming from the last."""
        repeat = result.repeat
        for i in range(repeat):
            push = phases.push(ops, result.agents, self.pace, verify=verify)
            result.pushes.append(push)
            elsewhere = (
                f" (others: paused {push.polled_others:.3f}s,"
                f" verified {push.verified_polled_others:.2f}s)" if len(ops) > 1 else ""
            )  # fmt: skip
            log(
                f"{slug}: push {i + 1}/{repeat}: p50 {push.p50:.3f}s p99 {push.p99:.3f}s"
                f" p100 {push.p100:.3f}s polled {push.polled:.3f}s"
                f" verified {push.verified:.2f}s{elsewhere}"
            )

    def _restarts(
        self, result: Run, site: Site, servers: list[Child], op: Operator, slug: str
    ) -> None:
        """``repeat`` crashes (kill -9) and restarts of the one server; ``servers[0]`` is
        replaced by each restarted server, so the caller stops the live one."""
        repeat = result.repeat
        for i in range(repeat):
            servers[0], again = phases.reconnect(site, servers[0], op, result.agents, self.pace)
            result.reconnects.append(again)
            log(
                f"{slug}: restart {i + 1}/{repeat}: listening {again.listening:.2f}s,"
                f" connected {again.connected:.2f}s, settled {again.settled:.2f}s,"
                f" re-acked {again.reacked:.2f}s"
            )
