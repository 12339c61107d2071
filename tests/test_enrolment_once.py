"""One valid certificate per agent id, whatever the number of tokens, calls or replicas.

Real servers (one on SQLite; two replicas on one PostgreSQL) and real ``Enroll`` calls
over TLS, each with its own join token: a leaked token must not get a second
certificate for an enrolled laptop, and two enrolments at once must not both win.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from agent_stub.identity import enrollment_channel
from agent_stub.identity import new_key_and_csr
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import replica_of

ROUNDS = 5


async def enrol(server: ServerProcess, token: str, agent_id: str) -> grpc.StatusCode:
    """One ``Enroll`` call on the server's enrolment port: OK or the refusal's status."""
    _, csr = new_key_and_csr()
    request = pb.EnrollRequest(token=token, agent_id=agent_id, csr_pem=csr.decode())
    async with enrollment_channel(server.enroll_address, server.ca_path.read_bytes()) as channel:
        try:
            await pb_grpc.EnrollmentStub(channel).Enroll(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.FAILED_PRECONDITION, exc.details()
            assert f"agent {agent_id} already has a valid certificate" in (exc.details() or "")
            return exc.code()
    return grpc.StatusCode.OK


async def enrol_at_once(
    first: ServerProcess, second: ServerProcess, cli: Cli, agent_id: str
) -> list[grpc.StatusCode]:
    tokens = cli.enroll_token(1), cli.enroll_token(1)
    return list(
        await asyncio.gather(enrol(first, tokens[0], agent_id), enrol(second, tokens[1], agent_id))
    )


def valid_certificates(cli: Cli, agent_id: str) -> int:
    rows = cli.json("certs", "list", "--json")
    return sum(1 for c in rows if c["subject"] == agent_id and not c.get("revoked_at"))


def test_two_enrolments_at_once_on_one_server_issue_one_certificate(
    server: ServerProcess, cli: Cli
) -> None:
    for n in range(ROUNDS):
        outcomes = asyncio.run(enrol_at_once(server, server, cli, f"laptop-{n}"))
        assert sorted(outcomes, key=str) == [
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.OK,
        ], outcomes
        assert valid_certificates(cli, f"laptop-{n}") == 1


@pytest.fixture
def two_replicas(
    start_server: Callable[..., ServerProcess], pg_dsn: str, tmp_path: Path
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    first = start_server("--database", pg_dsn)
    second = replica_of(first, tmp_path / "replica-b", ["--database", pg_dsn])
    second.start()
    try:
        yield first, second
    finally:
        second.stop()


def test_duplicate_enrolment_on_two_replicas_issues_one_certificate(
    two_replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    """Issue 15 finding 3: replica B used to issue what A refused, from its own memory."""
    first, second = two_replicas
    cli = Cli(first)
    # One after the other: B refuses what A issued, and A what B issued.
    assert asyncio.run(enrol(first, cli.enroll_token(1), "laptop-a")) is grpc.StatusCode.OK
    refused = asyncio.run(enrol(second, cli.enroll_token(1), "laptop-a"))
    assert refused is grpc.StatusCode.FAILED_PRECONDITION
    assert asyncio.run(enrol(second, cli.enroll_token(1), "laptop-b")) is grpc.StatusCode.OK
    refused = asyncio.run(enrol(first, cli.enroll_token(1), "laptop-b"))
    assert refused is grpc.StatusCode.FAILED_PRECONDITION
    # At once, one call on each replica.
    for n in range(ROUNDS):
        outcomes = asyncio.run(enrol_at_once(first, second, cli, f"laptop-{n}"))
        assert grpc.StatusCode.OK in outcomes and grpc.StatusCode.FAILED_PRECONDITION in outcomes
    for agent_id in ["laptop-a", "laptop-b", *(f"laptop-{n}" for n in range(ROUNDS))]:
        assert valid_certificates(cli, agent_id) == 1, agent_id
        assert valid_certificates(Cli(second), agent_id) == 1, agent_id
    # Revoked, the certificate no longer blocks the laptop's re-enrolment, on either replica.
    cli.ok("certs", "revoke", "laptop-a", "--reason", "laptop replaced")
    assert asyncio.run(enrol(second, cli.enroll_token(1), "laptop-a")) is grpc.StatusCode.OK
    assert valid_certificates(cli, "laptop-a") == 1
