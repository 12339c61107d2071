"""Composition root: wires store, control plane, governance, gRPC and HTTP adapters together.

Everything is built here from one ``ServerSettings`` (``control.settings``), observers
included: the plane is given its observers when it is built, the ingest sink its metrics.
Start-up is an ordered list of runnables (``control.lifecycle``), stopped in reverse;
``_add_runnables`` reads as the start order, and its comments say why each is where it is.

``serve`` runs the server until SIGINT/SIGTERM, as `killswitch serve` does;
``running_server`` runs it for as long as a block lasts, so tests and tools can run one
in their own process and event loop::

    async with running_server(settings) as server:
        ...  # server.grpc_port, server.http_port are bound and serving
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from control.addresses import dashboard_public_url
from control.addresses import ensure_can_listen
from control.addresses import require_loopback
from control.addresses import split_host_port
from control.audit_checkpoints import DEFAULT_DIR as DEFAULT_CHECKPOINT_DIR
from control.audit_checkpoints import CheckpointWriter
from control.domain import CompliancePolicy
from control.domain.readiness import ReadinessPolicy
from control.errors import InvalidInput
from control.events import DeferredObservers
from control.freshness import resync_seconds
from control.governance import Governance
from control.grpc_servers import GRPC_SERVER_OPTIONS
from control.grpc_servers import MAX_MESSAGE_BYTES
from control.grpc_servers import MAX_METADATA_BYTES
from control.grpc_servers import GrpcServers
from control.history import HistoryCompactor
from control.lifecycle import Manager
from control.lifecycle import Runnable
from control.lifecycle import wait_for_shutdown_signal
from control.metrics import Metrics
from control.pki import Authority
from control.pki import principal_from_pem
from control.plane import ControlPlane
from control.prometheus_sources import PrometheusSources
from control.readiness import Readiness
from control.replication import Replication
from control.rpc.agent_service import AgentControlService
from control.rpc.authz import Authenticator
from control.rpc.authz import AuthorizationInterceptor
from control.rpc.enrolment_gate import EnrolmentGate
from control.rpc.error_boundary import ErrorBoundary
from control.rpc.operator_service import DashboardService
from control.rpc.operator_service import EnrollmentService
from control.rpc.operator_service import IngestService
from control.rpc.operator_service import OperatorService
from control.rpc.operator_service import SelfService
from control.rpc.report_service import ReportService
from control.rpc.report_service import ReportSigner
from control.rpc.runbook_service import RunbookService
from control.runbooks import RunbookRunner
from control.settings import ServerSettings
from control.store import LoadedState
from control.store import Store
from control.store import describe_database
from control.store import open_store
from control.web import WebServer
from control.web.dashboard import Dashboard
from control.web.sessions import DashboardSessions
from control.webhooks.config import Webhook
from control.webhooks.config import load_webhooks
from control.webhooks.sender import WebhookSender
from control.wire import enrolment_port
from gc_policy import freeze_before_fanout
from gc_policy import run_gc_policy

# Where they were defined before the gRPC ports had a module of their own.
__all__ = [
    "GRPC_SERVER_OPTIONS",
    "MAX_MESSAGE_BYTES",
    "MAX_METADATA_BYTES",
    "RunningServer",
    "running_server",
    "serve",
]

log = structlog.get_logger("killswitch.server")


@dataclass(frozen=True, slots=True)
class RunningServer:
    """What a started server is listening on (its ports as bound: asked-for 0 is real)."""

    grpc_port: int
    http_port: int
    # None: /metrics is on the HTTP port.
    metrics_port: int | None
    # None: --insecure, no enrolment port.
    enroll_port: int | None
    replica_id: str


async def serve(settings: ServerSettings) -> None:
    """Run until SIGINT/SIGTERM; flush agent state before exiting."""
    async with running_server(settings, owns_process=True):
        await wait_for_shutdown_signal()
        log.info("server_stopping")


@asynccontextmanager
async def running_server(
    settings: ServerSettings, *, owns_process: bool = False
) -> AsyncIterator[RunningServer]:
    """The server, started, for as long as the block lasts; stopped as `serve` stops.

    ``owns_process``: this server is the process's only job, so it may tune the process's
    garbage collector (``gc_policy``); a server run inside a test process leaves it alone.
    """
    server = await _Server.build(settings, owns_process=owns_process)
    await server.manager.start()
    try:
        yield server.running()
    finally:
        await server.manager.stop()


@dataclass(frozen=True, slots=True)
class _Listen:
    """The addresses the settings name, checked before anything is opened."""

    grpc_host: str
    grpc_port: int
    http_host: str
    http_port: int
    metrics: tuple[str, int] | None
    enroll: str
    public_url: str


def _check_addresses(settings: ServerSettings) -> tuple[_Listen, Authority | None]:
    """What to listen on, and the server's keys (None: --insecure, loopback only)."""
    if settings.insecure:
        grpc_host, grpc_port = require_loopback(settings.grpc_address, what="gRPC")
        http_host, http_port = require_loopback(settings.http_address, what="HTTP")
        if settings.metrics_address:
            require_loopback(settings.metrics_address, what="metrics")
        if settings.audit_checkpoints or settings.audit_syslog:
            raise InvalidInput(
                "audit checkpoints are signed with the server key, which --insecure does"
                " not have: drop --audit-checkpoints/--audit-syslog"
            )
        authority = None
    else:
        grpc_host, grpc_port = split_host_port(settings.grpc_address, what="gRPC")
        http_host, http_port = split_host_port(settings.http_address, what="HTTP")
        authority = Authority.load(settings.data_dir)
    ensure_can_listen(grpc_host, grpc_port, what="gRPC")
    enroll = settings.enroll_address or _enroll_address_for(settings.grpc_address)
    if authority is not None:
        ensure_can_listen(*split_host_port(enroll, what="enrolment"), what="enrolment")
    listen = _Listen(
        grpc_host,
        grpc_port,
        http_host,
        http_port,
        metrics=(
            split_host_port(settings.metrics_address, what="metrics")
            if settings.metrics_address
            else None
        ),
        enroll=enroll,
        public_url=dashboard_public_url(settings.public_url) if settings.public_url else "",
    )
    return listen, authority


class _Server:
    """One server's parts, built and wired; ``manager`` starts and stops them in order."""

    @classmethod
    async def build(cls, settings: ServerSettings, *, owns_process: bool) -> _Server:
        """Check what can be checked before opening anything, then open the store and
        wire the rest to it (constructors do no I/O: nothing else to undo if one fails)."""
        listen, authority = _check_addresses(settings)
        prometheus = PrometheusSources(settings.prometheus)
        webhooks = load_webhooks(settings.webhooks, settings.webhook_secret_file)
        store = await open_store(settings.data_dir, settings.database)
        try:
            return cls(
                settings,
                listen,
                authority,
                store,
                prometheus=prometheus,
                webhooks=webhooks,
                owns_process=owns_process,
            )
        except BaseException:
            await store.close()
            raise

    def __init__(
        self,
        settings: ServerSettings,
        listen: _Listen,
        authority: Authority | None,
        store: Store,
        *,
        prometheus: PrometheusSources,
        webhooks: list[Webhook],
        owns_process: bool,
    ) -> None:
        self.settings, self.listen, self.authority, self.store = settings, listen, authority, store
        self.owns_process = owns_process
        self.manager = Manager(leads=store.try_lead)
        # Set by the last runnable to start, cleared by the first to stop.
        self.ready = False
        self.metrics = Metrics()
        # The runner and the dashboard's timeline need the plane built first (events.py).
        observers = DeferredObservers()
        self.plane = plane = ControlPlane(
            store,
            clock=time.time,
            policy=CompliancePolicy(settings.ack_deadline, settings.heartbeat_interval),
            lease_ttl=settings.lease_ttl,
            before_fanout=freeze_before_fanout if owns_process else _keep_gc,
            observer=observers,
        )
        self.governance = governance = Governance(
            plane, store, clock=time.time, authority=authority, resync=self._resync
        )
        self.readiness = Readiness(
            plane,
            governance,
            ReadinessPolicy(
                offline_days=settings.readiness_offline_days,
                min_agent_version=settings.min_agent_version,
                max_clock_skew=settings.max_clock_skew,
                lease_ttl=settings.lease_ttl,
            ),
            clock=time.time,
        )
        self.sessions = DashboardSessions(store, time.time, governance.is_revoked)
        self.runner = runner = RunbookRunner(
            plane,
            governance,
            clock=time.time,
            tick_seconds=settings.runbook_tick,
            prometheus=prometheus,
            leads=self.manager.leads,
        )
        self.replication = Replication(
            store,
            plane,
            governance,
            runner,
            resync_seconds=resync_seconds(settings.lease_ttl, settings.resync_interval),
        )
        self.compactor = HistoryCompactor(
            store, [governance, runner], clock=time.time, retention=settings.history_retention
        )
        self.dashboard = dashboard = Dashboard(
            plane,
            self.sessions,
            runner,
            secure_cookies=listen.public_url.startswith("https://"),
            readiness=self.readiness,
            governance=governance,
            sso=settings.oidc,
            base_url=self.dashboard_url,
        )
        observers.fill([self.metrics, dashboard.timeline, runner])
        self.metrics.watch(plane, self.readiness)
        self.checkpoints = None if authority is None else self._checkpoint_writer(authority)
        self.sender = WebhookSender(store, plane, webhooks) if webhooks else None
        self.web = WebServer(
            listen.http_host,
            listen.http_port,
            not_ready=self._not_ready,
            routes=[*([] if listen.metrics else self.metrics.routes()), *dashboard.routes()],
        )
        # Prometheus scrapes this; browsers and the dashboard's users need not reach it.
        self.metrics_web = (
            None
            if listen.metrics is None
            else WebServer(*listen.metrics, not_ready=self._not_ready, routes=self.metrics.routes())
        )
        # Built once the HTTP port is bound: the dashboard service names its URL.
        self.grpc: GrpcServers | None = None
        self._loaded: LoadedState | None = None  # by the plane, for those after it
        self._add_runnables()

    def _add_runnables(self) -> None:
        """The start order; each stops after everything added after it."""
        add, plane, governance = self.manager.add, self.plane, self.governance
        # Opened by ``build``, since everything is wired to it; closed after all else.
        add(Runnable("store", stop=self.store.close))
        # Probes answer ("starting") while the state loads, however long that takes.
        add(Runnable("http", self.web.start, self._stop_web))
        if self.metrics_web is not None:
            add(Runnable("metrics http", self.metrics_web.start, self.metrics_web.stop))
        # Bound before the state loads, so a busy port fails at once; served at the end.
        add(Runnable("grpc ports", self._bind_grpc))
        if self.checkpoints is not None:
            # Stops once nothing writes any more: its last head is signed.
            add(Runnable("audit checkpoints", self.checkpoints.start, self.checkpoints.stop))
        if self.sender is not None:
            # Before anything is audited, so no event goes unqueued.
            add(Runnable("webhooks", _started(self.sender.start), self.sender.stop))
        # Only the hot part of the state is loaded: what is due is archived first.
        add(Runnable("history archive", self.compactor.compact_logged))
        add(Runnable("plane", self._start_plane, plane.stop))
        add(Runnable("governance", lambda: governance.start(self._state())))
        add(
            Runnable(
                "runbook runner",
                lambda: self.runner.start(self._state().shared.runs),
                self.runner.stop,
                needs_leader=True,
            )
        )
        add(Runnable("replication", self.replication.start, self.replication.stop))
        add(Runnable("history compaction", _started(self.compactor.start), self.compactor.stop))
        # Stops after the ports: every refusal is counted.
        refusals = governance.refusals
        add(Runnable("refusal counts", _started(refusals.start), refusals.stop))
        add(Runnable("grpc", lambda: self._grpc().start(), lambda: self._grpc().stop()))
        add(_background("loop lag", self.metrics.loop_lag.run))
        if self.owns_process:
            add(_background("gc policy", run_gc_policy))
        add(Runnable("readiness", self._serving, self._not_serving))

    def running(self) -> RunningServer:
        grpc = self._grpc()
        return RunningServer(
            grpc_port=grpc.port,
            http_port=self.web.port,
            metrics_port=None if self.metrics_web is None else self.metrics_web.port,
            enroll_port=grpc.enrol_port,
            replica_id=self.plane.replica_id,
        )

    def dashboard_url(self) -> str:
        return self.listen.public_url or _local_dashboard_url(self.listen.http_host, self.web.port)

    # ------------------------------------------------------------ wiring

    async def _resync(self) -> None:
        """Late-bound: the replication loop needs the governance, which needs this."""
        await self.replication.resync()

    def _checkpoint_writer(self, authority: Authority) -> CheckpointWriter:
        settings = self.settings
        return CheckpointWriter(
            self.store,
            Path(settings.audit_checkpoints or settings.data_dir / DEFAULT_CHECKPOINT_DIR),
            key_pem=authority.server_key_pem,
            cert_pem=authority.server_cert_pem,
            clock=time.time,
            interval=settings.audit_checkpoint_interval,
            to_syslog=settings.audit_syslog,
        )

    def _grpc_servers(self) -> GrpcServers:
        plane, governance, authority = self.plane, self.governance, self.authority
        interceptor = AuthorizationInterceptor(
            Authenticator(
                insecure=authority is None,
                # Secure: also checks who signed what. Insecure: never asked.
                principal_from_pem=(
                    authority.principal_from_pem if authority else principal_from_pem
                ),
                is_revoked=governance.is_revoked,
            ),
            governance,
            errors=ErrorBoundary(governance),
            max_calls_per_identity=self.settings.max_calls_per_identity,
        )
        signer = (
            None
            if authority is None
            else ReportSigner(authority.server_key_pem, authority.server_cert_pem, self.checkpoints)
        )
        services: list[tuple[Any, Any]] = [
            (pb_grpc.add_AgentControlServicer_to_server, AgentControlService(plane, governance)),
            (
                pb_grpc.add_OperatorServicer_to_server,
                OperatorService(plane, governance, self.readiness),
            ),
            (pb_grpc.add_SelfServiceServicer_to_server, SelfService(plane, governance)),
            (pb_grpc.add_IngestServicer_to_server, IngestService(plane, governance)),
            (
                pb_grpc.add_DashboardServicer_to_server,
                DashboardService(self.sessions, self.dashboard_url()),
            ),
            (pb_grpc.add_RunbooksServicer_to_server, RunbookService(self.runner, governance)),
            (pb_grpc.add_ReportsServicer_to_server, ReportService(plane, governance, signer)),
        ]
        gate = EnrolmentGate(
            governance,
            clock=time.monotonic,
            burst=self.settings.enrol_burst,
            per_second=self.settings.enrol_rate,
        )
        return GrpcServers(
            interceptors=[self.metrics.interceptor(), interceptor],
            services=services,
            authority=authority,
            enrolment=(EnrollmentService(governance), gate) if authority else None,
        )

    # ------------------------------------------------------------ runnables' steps

    async def _bind_grpc(self) -> None:
        self.grpc = self._grpc_servers()
        listen = self.listen
        self.grpc.bind(
            f"{listen.grpc_host}:{listen.grpc_port}", self.settings.grpc_address, listen.enroll
        )

    def _grpc(self) -> GrpcServers:
        assert self.grpc is not None, "the gRPC servers are built when their ports are bound"
        return self.grpc

    async def _start_plane(self) -> None:
        self._loaded = await self.plane.start()

    def _state(self) -> LoadedState:
        assert self._loaded is not None, "the state is loaded when the plane starts"
        return self._loaded

    async def _stop_web(self) -> None:
        await self.dashboard.close()  # live update streams end now, not at their next tick
        await self.web.stop()

    def _not_ready(self) -> str:
        return self.plane.why_not_leasing() if self.ready else "starting or stopping"

    async def _serving(self) -> None:
        await self._grpc().serving()
        self.ready = True
        self._log_listening()

    async def _not_serving(self) -> None:
        self.ready = False
        await self._grpc().not_serving()

    def _log_listening(self) -> None:
        settings, listen, running = self.settings, self.listen, self.running()
        log.info(
            "server_listening",
            grpc=f"{listen.grpc_host}:{running.grpc_port}",
            http=f"{listen.http_host}:{running.http_port}",
            metrics=f"{listen.http_host}:{running.http_port}"
            if running.metrics_port is None
            else f"{settings.metrics_address.rpartition(':')[0]}:{running.metrics_port}",
            audit_checkpoints=None if self.checkpoints is None else str(self.checkpoints.directory),
            enroll=None if self.authority is None else listen.enroll,
            mtls=self.authority is not None,
            data_dir=str(settings.data_dir),
            database=describe_database(settings.database, settings.data_dir),
            replica=self.plane.replica_id,
            epoch=self.plane.epoch,
        )
        if self.authority is None:
            log.warning("insecure_mode", detail="no mTLS: identities are claimed, not proven")


def _keep_gc() -> None:
    """A server inside another program's process leaves its garbage collector alone."""


def _started(start: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    """A synchronous ``start`` (it spawns its task and returns) as a runnable's."""

    async def started() -> None:
        start()

    return started


def _background(name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> Runnable:
    """A loop that runs until cancelled, as a runnable: started as a task, cancelled at stop."""
    tasks: list[asyncio.Task[None]] = []

    async def start() -> None:
        tasks.append(asyncio.create_task(run(), name=name))

    async def stop() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return Runnable(name, start, stop)


def _enroll_address_for(grpc_address: str) -> str:
    host, port = split_host_port(grpc_address, what="gRPC")
    return f"{host}:{enrolment_port(port)}"


def _local_dashboard_url(host: str, port: int) -> str:
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://[{shown_host}]:{port}" if ":" in shown_host else f"http://{shown_host}:{port}"
