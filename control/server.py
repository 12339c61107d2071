"""Composition root: wires store, control plane, governance, gRPC and HTTP adapters together."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from control.addresses import (
    dashboard_public_url,
    ensure_can_listen,
    require_loopback,
    split_host_port,
)
from control.audit_checkpoints import DEFAULT_DIR as DEFAULT_CHECKPOINT_DIR
from control.audit_checkpoints import DEFAULT_INTERVAL as DEFAULT_CHECKPOINT_INTERVAL
from control.audit_checkpoints import CheckpointWriter
from control.domain import CompliancePolicy
from control.domain.history import DEFAULT_HISTORY_RETENTION_SECONDS
from control.domain.readiness import (
    DEFAULT_MAX_CLOCK_SKEW_SECONDS,
    DEFAULT_OFFLINE_DAYS,
    ReadinessPolicy,
)
from control.errors import InvalidInput, KillswitchError
from control.events import Observers
from control.freshness import DEFAULT_RESYNC_SECONDS, resync_seconds
from control.governance import Governance
from control.history import HistoryCompactor
from control.metrics import Metrics
from control.pki import Authority, principal_from_pem
from control.plane import ControlPlane
from control.prometheus_sources import PrometheusSources
from control.readiness import Readiness
from control.replication import Replication
from control.rpc.agent_service import AgentControlService
from control.rpc.authz import Authenticator, AuthorizationInterceptor
from control.rpc.enrolment_gate import (
    ENROL_BURST,
    ENROL_PER_SECOND,
    MAX_STREAMS_PER_CONNECTION,
    EnrolmentGate,
)
from control.rpc.error_boundary import ErrorBoundary
from control.rpc.operator_service import (
    DashboardService,
    EnrollmentService,
    IngestService,
    OperatorService,
    SelfService,
)
from control.rpc.report_service import ReportService, ReportSigner
from control.rpc.runbook_service import RunbookService
from control.runbooks import RunbookRunner
from control.store import describe_database, open_store
from control.web import WebServer
from control.web.dashboard import Dashboard
from control.web.oidc import OidcSettings
from control.web.sessions import DashboardSessions
from control.webhooks.config import WebhookSpec, load_webhooks
from control.webhooks.sender import WebhookSender
from control.wire import enrolment_port
from gc_policy import freeze_before_fanout, run_gc_policy

log = structlog.get_logger("killswitch.server")

# Every legitimate message is a few hundred bytes; a cap keeps floods cheap to refuse.
MAX_MESSAGE_BYTES = 64 * 1024
MAX_METADATA_BYTES = 8 * 1024

# Agents ping every 20 s; allow that, and find dead peers within ~40 s.
GRPC_SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_metadata_size", MAX_METADATA_BYTES),
    # The soft limit above refuses only some requests over it; this one refuses all.
    ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
    # Without this a second server on the same port silently shares the fleet.
    ("grpc.so_reuseport", 0),
]


# What reflection lists: every service on the main port, standard ones included.
SERVICE_NAMES = (
    *(service.full_name for service in pb.DESCRIPTOR.services_by_name.values()),
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    data_dir: Path
    grpc_address: str = "127.0.0.1:50051"
    http_address: str = "127.0.0.1:8080"
    # Empty: the gRPC port + 1. Not served with --insecure (there is no CA).
    enroll_address: str = ""
    ack_deadline: float = 30.0
    heartbeat_interval: float = 10.0
    lease_ttl: float = 60.0
    insecure: bool = False
    # Empty: SQLite in data_dir. A postgresql:// URL: PostgreSQL (several replicas).
    database: str = ""
    # Replicas re-read shared state this often even without a notification.
    resync_interval: float = DEFAULT_RESYNC_SECONDS
    max_calls_per_identity: int = 16
    # The Prometheus servers runbook gates may query: (name a runbook uses, URL).
    prometheus: tuple[tuple[str, str], ...] = ()
    runbook_tick: float = 1.0
    # Lifted holds, decided requests and ended runs older than this are archived.
    history_retention: float = DEFAULT_HISTORY_RETENTION_SECONDS
    # The dashboard as browsers reach it (a TLS proxy); empty: http://HTTP-ADDRESS.
    public_url: str = ""
    # Empty: /metrics on the HTTP address. Else /metrics only here.
    metrics_address: str = ""
    # Signed audit checkpoints; empty: DATA/audit-checkpoints. Not with --insecure.
    audit_checkpoints: str = ""
    audit_checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL
    audit_syslog: bool = False
    # Readiness policy (besides the lease TTL above): see control.domain.readiness.
    min_agent_version: str = ""
    readiness_offline_days: float = DEFAULT_OFFLINE_DAYS
    max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW_SECONDS
    # Sign-in with the company's SSO (OpenID Connect); None: login links only.
    oidc: OidcSettings | None = None
    # Outbound webhooks (``control.webhooks``) and the secret file they share.
    webhooks: tuple[WebhookSpec, ...] = ()
    webhook_secret_file: str = ""
    # The enrolment port's token bucket per source address (control/rpc/enrolment_gate.py).
    enrol_rate: float = ENROL_PER_SECOND
    enrol_burst: int = ENROL_BURST


def enroll_address_for(grpc_address: str) -> str:
    host, port = split_host_port(grpc_address, what="gRPC")
    return f"{host}:{enrolment_port(port)}"


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT/SIGTERM; flush agent state before exiting."""
    if config.insecure:
        grpc_host, grpc_port = require_loopback(config.grpc_address, what="gRPC")
        http_host, http_port = require_loopback(config.http_address, what="HTTP")
        if config.metrics_address:
            require_loopback(config.metrics_address, what="metrics")
        if config.audit_checkpoints or config.audit_syslog:
            raise InvalidInput(
                "audit checkpoints are signed with the server key, which --insecure does"
                " not have: drop --audit-checkpoints/--audit-syslog"
            )
        authority = None
    else:
        grpc_host, grpc_port = split_host_port(config.grpc_address, what="gRPC")
        http_host, http_port = split_host_port(config.http_address, what="HTTP")
        authority = Authority.load(config.data_dir)
    ensure_can_listen(grpc_host, grpc_port, what="gRPC")
    metrics_address = (
        split_host_port(config.metrics_address, what="metrics") if config.metrics_address else None
    )
    public_url = dashboard_public_url(config.public_url) if config.public_url else ""
    enroll_address = config.enroll_address or enroll_address_for(config.grpc_address)
    if authority is not None:
        ensure_can_listen(*split_host_port(enroll_address, what="enrolment"), what="enrolment")
    prometheus = PrometheusSources(config.prometheus)
    webhooks = load_webhooks(config.webhooks, config.webhook_secret_file)
    store = await open_store(config.data_dir, config.database)
    plane = ControlPlane(
        store,
        clock=time.time,
        policy=CompliancePolicy(config.ack_deadline, config.heartbeat_interval),
        lease_ttl=config.lease_ttl,
        before_fanout=freeze_before_fanout,
    )

    async def resync() -> None:
        """Late-bound: the replication loop, made below, needs the governance itself."""
        await replication.resync()

    governance = Governance(plane, store, clock=time.time, authority=authority, resync=resync)
    readiness = Readiness(
        plane,
        governance,
        ReadinessPolicy(
            offline_days=config.readiness_offline_days,
            min_agent_version=config.min_agent_version,
            max_clock_skew=config.max_clock_skew,
            lease_ttl=config.lease_ttl,
        ),
        clock=time.time,
    )
    sessions = DashboardSessions(store, time.time, governance.is_revoked)
    metrics = Metrics()
    runner = RunbookRunner(
        plane,
        governance,
        clock=time.time,
        tick_seconds=config.runbook_tick,
        prometheus=prometheus,
        leads=store.try_lead,
    )
    replication = Replication(
        store,
        plane,
        governance,
        runner,
        resync_seconds=resync_seconds(config.lease_ttl, config.resync_interval),
    )
    compactor = HistoryCompactor(
        store, [governance, runner], clock=time.time, retention=config.history_retention
    )
    dashboard = Dashboard(
        plane,
        sessions,
        runner,
        secure_cookies=public_url.startswith("https://"),
        readiness=readiness,
        governance=governance,
        sso=config.oidc,
        base_url=lambda: public_url or dashboard_url(http_host, web_server.port),
    )
    checkpoints = (
        None
        if authority is None
        else CheckpointWriter(
            store,
            Path(config.audit_checkpoints or config.data_dir / DEFAULT_CHECKPOINT_DIR),
            key_pem=authority.server_key_pem,
            cert_pem=authority.server_cert_pem,
            clock=time.time,
            interval=config.audit_checkpoint_interval,
            to_syslog=config.audit_syslog,
        )
    )
    sender = WebhookSender(store, plane, webhooks) if webhooks else None
    plane.observer = Observers([metrics, dashboard.timeline, runner])
    metrics.watch(plane, readiness)
    servers: list[grpc.aio.Server] = []
    ready = False

    def not_ready() -> str:
        return plane.why_not_leasing() if ready else "starting or stopping"

    web_server = WebServer(
        http_host,
        http_port,
        not_ready=not_ready,
        routes=[*([] if metrics_address else metrics.routes()), *dashboard.routes()],
    )
    # Prometheus scrapes this; browsers and the dashboard's users need not reach it.
    metrics_server = (
        None
        if metrics_address is None
        else WebServer(*metrics_address, not_ready=not_ready, routes=metrics.routes())
    )
    # The asyncio servicer; `health.aio` is set at import time, which the stubs miss.
    health = grpc_health.aio.HealthServicer()  # type: ignore[attr-defined]
    try:
        await web_server.start()
        if metrics_server is not None:
            await metrics_server.start()
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
            max_calls_per_identity=config.max_calls_per_identity,
        )
        server = grpc.aio.server(
            interceptors=[metrics.interceptor(), interceptor], options=GRPC_SERVER_OPTIONS
        )
        servers.append(server)
        pb_grpc.add_AgentControlServicer_to_server(AgentControlService(plane, governance), server)
        operator = OperatorService(plane, governance, readiness)
        pb_grpc.add_OperatorServicer_to_server(operator, server)
        pb_grpc.add_SelfServiceServicer_to_server(SelfService(plane, governance), server)
        pb_grpc.add_IngestServicer_to_server(IngestService(plane, governance), server)
        pb_grpc.add_DashboardServicer_to_server(
            DashboardService(sessions, public_url or dashboard_url(http_host, web_server.port)),
            server,
        )
        pb_grpc.add_RunbooksServicer_to_server(RunbookService(runner, governance), server)
        signer = (
            None
            if authority is None
            else ReportSigner(authority.server_key_pem, authority.server_cert_pem, checkpoints)
        )
        pb_grpc.add_ReportsServicer_to_server(ReportService(plane, governance, signer), server)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(SERVICE_NAMES, server)
        address = f"{grpc_host}:{grpc_port}"
        if authority is None:
            bound = _bind(lambda: server.add_insecure_port(address), config.grpc_address)
        else:
            credentials = grpc.ssl_server_credentials(
                [(authority.server_key_pem, authority.server_cert_pem)],
                root_certificates=authority.ca_pem,
                require_client_auth=True,
            )
            bound = _bind(lambda: server.add_secure_port(address, credentials), address)
            enroll = grpc.aio.server(
                interceptors=[
                    EnrolmentGate(
                        governance,
                        clock=time.monotonic,
                        burst=config.enrol_burst,
                        per_second=config.enrol_rate,
                    )
                ],
                options=[
                    *GRPC_SERVER_OPTIONS,
                    ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
                ],
            )
            servers.append(enroll)
            pb_grpc.add_EnrollmentServicer_to_server(EnrollmentService(governance), enroll)
            server_only = grpc.ssl_server_credentials(
                [(authority.server_key_pem, authority.server_cert_pem)]
            )
            _bind(lambda: enroll.add_secure_port(enroll_address, server_only), enroll_address)
        # Ports are bound but nothing is served until the state is loaded: only its
        # hot part, once what is due is archived.
        await compactor.compact_logged()
        if sender is not None:
            sender.start()  # before anything is audited, so no event goes unqueued
        state = await plane.start()
        await governance.start(state)
        await runner.start(state.shared.runs)
        await replication.start()
        compactor.start()
        if checkpoints is not None:
            await checkpoints.start()
        governance.refusals.start()
        for each in servers:
            await each.start()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        ready = True
        log.info(
            "server_listening",
            grpc=f"{grpc_host}:{bound}",
            http=f"{http_host}:{web_server.port}",
            metrics=f"{http_host}:{web_server.port}"
            if metrics_server is None
            else f"{config.metrics_address.rpartition(':')[0]}:{metrics_server.port}",
            audit_checkpoints=None if checkpoints is None else str(checkpoints.directory),
            enroll=None if authority is None else enroll_address,
            mtls=authority is not None,
            data_dir=str(config.data_dir),
            database=describe_database(config.database, config.data_dir),
            replica=plane.replica_id,
            epoch=plane.epoch,
        )
        if authority is None:
            log.warning("insecure_mode", detail="no mTLS: identities are claimed, not proven")
        gc_policy = asyncio.create_task(run_gc_policy(), name="gc-policy")
        loop_lag = asyncio.create_task(metrics.loop_lag.run(), name="loop-lag")
        await _wait_for_shutdown_signal()
        gc_policy.cancel()
        loop_lag.cancel()
        log.info("server_stopping")
    finally:
        ready = False
        await compactor.stop()
        await replication.stop()
        await runner.stop()
        await health.enter_graceful_shutdown()
        await dashboard.close()  # live update streams end now, not at their next tick
        await web_server.stop()
        if metrics_server is not None:
            await metrics_server.stop()
        for each in servers:
            await each.stop(grace=2)
        await governance.refusals.stop()  # after the ports: every refusal is counted
        await plane.stop()
        if sender is not None:
            await sender.stop()
        if checkpoints is not None:
            await checkpoints.stop()  # the last head, signed, once nothing writes any more
        await store.close()


def dashboard_url(host: str, port: int) -> str:
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://[{shown_host}]:{port}" if ":" in shown_host else f"http://{shown_host}:{port}"


def _bind(add_port: Any, address: str) -> int:
    try:
        bound = int(add_port())
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise KillswitchError(f"cannot listen on {address} (address in use?)")
    return bound


async def _wait_for_shutdown_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
