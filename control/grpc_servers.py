"""The server's gRPC ports: the main one (every service, mTLS) and the enrolment one.

Built by the composition root (``control.server``) from the services it made. The ports
are bound early (``bind``: a busy port fails before the state is loaded) and served late
(``start``: nothing is answered until the state is).
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from control.errors import KillswitchError
from control.pki import Authority
from control.rpc.enrolment_gate import MAX_STREAMS_PER_CONNECTION

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

# How long calls in flight may finish once the server is told to stop.
STOP_GRACE_SECONDS = 2


class GrpcServers:
    """The main port with ``services`` on it, and, with mTLS (an ``authority``), the
    enrolment port: the enrolment service behind its gate (an interceptor)."""

    def __init__(
        self,
        *,
        interceptors: list[Any],
        services: list[tuple[Any, Any]],
        authority: Authority | None,
        enrolment: tuple[pb_grpc.EnrollmentServicer, Any] | None,
    ) -> None:
        """``services``: (``add_XServicer_to_server``, servicer) pairs."""
        self._authority = authority
        # The asyncio servicer; `health.aio` is set at import time, which the stubs miss.
        self.health = grpc_health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.main = grpc.aio.server(interceptors=interceptors, options=GRPC_SERVER_OPTIONS)
        for add, servicer in services:
            add(servicer, self.main)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.main)
        reflection.enable_server_reflection(SERVICE_NAMES, self.main)
        self.enrol: grpc.aio.Server | None = None
        if authority is not None:
            assert enrolment is not None, "an mTLS server has an enrolment port"
            service, gate = enrolment
            self.enrol = grpc.aio.server(
                interceptors=[gate],
                options=[
                    *GRPC_SERVER_OPTIONS,
                    ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
                ],
            )
            pb_grpc.add_EnrollmentServicer_to_server(service, self.enrol)
        self.port = 0
        self.enrol_port: int | None = None

    def bind(self, address: str, given: str, enroll_address: str) -> None:
        """``given``: the address as configured, for the error when it is taken."""
        authority = self._authority
        if authority is None:
            self.port = bind_port(lambda: self.main.add_insecure_port(address), given)
            return
        credentials = grpc.ssl_server_credentials(
            [(authority.server_key_pem, authority.server_cert_pem)],
            root_certificates=authority.ca_pem,
            require_client_auth=True,
        )
        self.port = bind_port(lambda: self.main.add_secure_port(address, credentials), address)
        server_only = grpc.ssl_server_credentials(
            [(authority.server_key_pem, authority.server_cert_pem)]
        )
        enrol = self.enrol
        assert enrol is not None
        self.enrol_port = bind_port(
            lambda: enrol.add_secure_port(enroll_address, server_only), enroll_address
        )

    async def start(self) -> None:
        for server in self._servers():
            await server.start()

    async def serving(self) -> None:
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def not_serving(self) -> None:
        await self.health.enter_graceful_shutdown()

    async def stop(self) -> None:
        for server in self._servers():
            await server.stop(grace=STOP_GRACE_SECONDS)

    def _servers(self) -> list[grpc.aio.Server]:
        return [self.main] if self.enrol is None else [self.main, self.enrol]


def bind_port(add_port: Any, address: str) -> int:
    """The port ``add_port()`` bound, or one clear line: gRPC either answers 0 or raises
    ``RuntimeError`` when the address is taken, depending on the call."""
    try:
        bound = int(add_port())
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise KillswitchError(f"cannot listen on {address} (address in use?)")
    return bound
