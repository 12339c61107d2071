"""Composition root: wires store, control plane, gRPC and HTTP adapters together."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from control.addresses import ensure_can_listen, require_loopback
from control.domain import CompliancePolicy
from control.errors import KillswitchError
from control.gc_policy import freeze_before_fanout, run_gc_policy
from control.http_health import HealthServer
from control.plane import ControlPlane
from control.rpc.agent_service import AgentControlService
from control.rpc.operator_service import IngestService, OperatorService
from control.store.sqlite import SqliteStore

log = structlog.get_logger("killswitch.server")

# Agents ping every 20 s; allow that, and find dead peers within ~40 s.
GRPC_SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # Without this a second server on the same port silently shares the fleet.
    ("grpc.so_reuseport", 0),
]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    data_dir: Path
    grpc_address: str = "127.0.0.1:50051"
    http_address: str = "127.0.0.1:8080"
    ack_deadline: float = 30.0
    heartbeat_interval: float = 10.0
    lease_ttl: float = 60.0


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT/SIGTERM; flush agent state before exiting."""
    grpc_host, grpc_port = require_loopback(config.grpc_address, what="gRPC")
    http_host, http_port = require_loopback(config.http_address, what="HTTP")
    ensure_can_listen(grpc_host, grpc_port, what="gRPC")
    ensure_can_listen(http_host, http_port, what="HTTP")
    store = await SqliteStore.open(config.data_dir)
    plane = ControlPlane(
        store,
        clock=time.time,
        policy=CompliancePolicy(config.ack_deadline, config.heartbeat_interval),
        lease_ttl=config.lease_ttl,
        before_fanout=freeze_before_fanout,
    )
    server: grpc.aio.Server | None = None
    health: HealthServer | None = None
    ready = False
    try:
        server = grpc.aio.server(options=GRPC_SERVER_OPTIONS)
        pb_grpc.add_AgentControlServicer_to_server(AgentControlService(plane), server)
        pb_grpc.add_OperatorServicer_to_server(OperatorService(plane), server)
        pb_grpc.add_IngestServicer_to_server(IngestService(plane), server)
        try:
            bound = server.add_insecure_port(f"{grpc_host}:{grpc_port}")
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise KillswitchError(f"cannot listen on {config.grpc_address} (address in use?)")
        try:
            health = HealthServer(http_host, http_port, lambda: ready)
        except OSError as exc:
            raise KillswitchError(
                f"cannot listen on {config.http_address}: {exc.strerror}"
            ) from None
        # Ports are bound but nothing is served until the state is loaded.
        await plane.start()
        await server.start()
        health.start()
        ready = True
        log.info(
            "server_listening",
            grpc=f"{grpc_host}:{bound}",
            http=f"{http_host}:{health.port}",
            data_dir=str(config.data_dir),
            epoch=plane.epoch,
        )
        gc_policy = asyncio.create_task(run_gc_policy(), name="gc-policy")
        await _wait_for_shutdown_signal()
        gc_policy.cancel()
        log.info("server_stopping")
    finally:
        ready = False
        if health is not None:
            health.stop()
        if server is not None:
            await server.stop(grace=2)
        await plane.stop()
        await store.close()


async def _wait_for_shutdown_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
