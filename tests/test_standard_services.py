"""Standard gRPC services, as grpc-health-probe and grpcurl use them, over real mTLS.

The server runs in the test process (``start_in_process_server``): these tests ask
its gRPC ports only.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from control.pki import load_identity
from tests.conftest import ServerProcess


@pytest.fixture
def server(start_in_process_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_in_process_server()


def secure_channel(server: ServerProcess, name: str) -> grpc.Channel:
    identity = load_identity(server.identity(name))
    credentials = grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem)
    return grpc.secure_channel(server.address, credentials)


def test_health_reports_serving(server: ServerProcess) -> None:
    with secure_channel(server, "automation-1") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_services(server: ServerProcess) -> None:
    with secure_channel(server, "sre-1") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {
            "killswitch.v1.Operator",
            "killswitch.v1.AgentControl",
            "killswitch.v1.SelfService",
            "grpc.health.v1.Health",
        } <= services
        described = database.FindFileContainingSymbol("killswitch.v1.Operator")
        assert any(s.name == "Operator" for s in described.service)


def test_reflection_is_not_for_agents_or_employees(server: ServerProcess) -> None:
    with secure_channel(server, "employee-1") as channel:
        try:
            list(ProtoReflectionDescriptorDatabase(channel).get_services())
        except grpc.RpcError as exc:
            assert exc.code() is grpc.StatusCode.PERMISSION_DENIED
        else:
            raise AssertionError("an employee listed the server's services")
