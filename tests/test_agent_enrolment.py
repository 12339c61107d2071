"""Agent enrolment and mTLS, against in-test servers that use the real CA over real TLS."""

from __future__ import annotations

import asyncio
import signal
import stat
import time
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import grpc
import pytest
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from agent_stub import Agent
from agent_stub import AgentConfig
from agent_stub.channels import open_channel
from agent_stub.identity import EXIT_BAD_INPUT
from agent_stub.identity import AgentIdentity
from agent_stub.identity import EnrolmentError
from agent_stub.identity import default_enroll_target
from agent_stub.identity import enrol
from agent_stub.identity import load_enrolled
from control.domain.identity import Principal
from control.domain.identity import Role
from control.errors import InvalidInput
from control.pki import Authority
from control.pki import initialise
from control.pki import principal_from_pem
from tests.agent_support import agent_cli
from tests.agent_support import wait_until
from tests.conftest import BIN
from tests.conftest import free_port

TOKEN = "kst_test.s3cret"
DAY = 86_400.0


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    data = tmp_path_factory.mktemp("enrolment") / "data"
    initialise(data, now=time.time())
    return Authority.load(data)


@pytest.fixture(scope="module")
def other_authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    """The CA of a control server that was initialised again from scratch."""
    data = tmp_path_factory.mktemp("other") / "data"
    initialise(data, now=time.time())
    return Authority.load(data)


@pytest.fixture
def ca_file(authority: Authority, tmp_path: Path) -> Path:
    """The CA an MDM would pre-seed on the laptop."""
    path = tmp_path / "trusted-ca.pem"
    path.write_bytes(authority.ca_pem)
    return path


class FakeEnrollment(pb_grpc.EnrollmentServicer):
    """Accepts one token and signs with the real CA; what the server's checks boil down to."""

    def __init__(self, authority: Authority, *, now: float | None = None) -> None:
        self.authority = authority
        self.now = now
        self.calls = 0
        self.busy_for = 0  # the first calls answered as a flooded port answers

    async def Enroll(  # noqa: N802 - gRPC method name
        self,
        request: pb.EnrollRequest,
        context: grpc.aio.ServicerContext[pb.EnrollRequest, pb.EnrollResponse],
    ) -> pb.EnrollResponse:
        self.calls += 1
        if self.calls <= self.busy_for:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many enrolment calls")
        if request.token != TOKEN:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "unknown enrolment token")
        now = time.time() if self.now is None else self.now
        try:
            cert_pem, _ = self.authority.sign_agent_csr(request.csr_pem, request.agent_id, now=now)
        except InvalidInput as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.EnrollResponse(
            certificate_pem=cert_pem.decode(), ca_pem=self.authority.ca_pem.decode()
        )


class CertifiedControl(pb_grpc.AgentControlServicer):
    """Admits a stream only when its Hello names the agent its client certificate names."""

    def __init__(self) -> None:
        self.admitted: list[Principal] = []
        self.refused: list[str] = []

    async def Connect(  # type: ignore[override]  # noqa: N802 - gRPC method name
        self, request_iterator: Any, context: Any
    ) -> None:
        principal = principal_from_pem(next(iter(context.auth_context()["x509_pem_cert"])))
        first = await context.read()
        if principal.role is not Role.AGENT or first.hello.agent_id != principal.name:
            self.refused.append(first.hello.agent_id)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not your agent id")
        self.admitted.append(principal)
        allowed = pb.Directive(epoch=1, mode=pb.MODE_ALLOWED, heartbeat_interval_seconds=3600)
        await context.write(pb.ServerMessage(directive=allowed))
        while isinstance(await context.read(), pb.AgentMessage):
            pass


@dataclass
class Servers:
    enroll_address: str
    control_address: str
    enrollment: FakeEnrollment
    control: CertifiedControl = field(default_factory=CertifiedControl)

    async def enrol(
        self, state_dir: Path, token: str = TOKEN, agent_id: str = "laptop-1"
    ) -> AgentIdentity:
        """``agent_id`` enrols here with ``token`` (or reuses what ``state_dir`` holds),
        trusting this enrolment server's CA."""
        ca_pem = self.enrollment.authority.ca_pem
        return await enrol(self.enroll_address, token, agent_id, state_dir, ca_pem)


@asynccontextmanager
async def servers(authority: Authority, *, now: float | None = None) -> AsyncIterator[Servers]:
    """Enrolment over server-only TLS, and AgentControl requiring client certificates."""
    keys = [(authority.server_key_pem, authority.server_cert_pem)]
    enroll_server, control_server = grpc.aio.server(), grpc.aio.server()
    running = Servers("", "", FakeEnrollment(authority, now=now))
    pb_grpc.add_EnrollmentServicer_to_server(running.enrollment, enroll_server)
    pb_grpc.add_AgentControlServicer_to_server(running.control, control_server)
    enroll_port = enroll_server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(keys))
    mtls = grpc.ssl_server_credentials(
        keys, root_certificates=authority.ca_pem, require_client_auth=True
    )
    control_port = control_server.add_secure_port("127.0.0.1:0", mtls)
    running.enroll_address = f"127.0.0.1:{enroll_port}"
    running.control_address = f"127.0.0.1:{control_port}"
    await enroll_server.start()
    await control_server.start()
    try:
        yield running
    finally:
        await asyncio.gather(enroll_server.stop(grace=None), control_server.stop(grace=None))


def with_servers(
    authority: Authority, scenario: Callable[[Servers], Awaitable[object]], **kwargs: Any
) -> None:
    async def main() -> None:
        async with servers(authority, **kwargs) as running:
            await scenario(running)

    asyncio.run(main())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- the library


def test_enrolment_stores_an_owner_only_identity_and_the_next_start_reuses_it(
    authority: Authority, tmp_path: Path
) -> None:
    state = tmp_path / "state"

    async def scenario(running: Servers) -> None:
        identity = await running.enrol(state)
        principal = principal_from_pem(identity.cert_pem)
        assert (principal.name, principal.role) == ("laptop-1", Role.AGENT)
        assert {p.name: mode(p) for p in state.iterdir()} == {
            "cert.pem": 0o600,
            "key.pem": 0o600,
            "ca.pem": 0o600,
        }
        assert mode(state) == 0o700
        assert (state / "cert.pem").read_bytes() == identity.cert_pem
        assert (state / "ca.pem").read_bytes() == authority.ca_pem

        again = await running.enrol(state, token="")
        assert again == identity and running.enrollment.calls == 1, "no second enrolment"

    with_servers(authority, scenario)


def test_an_enrolled_agent_connects_over_mtls_as_itself(
    authority: Authority, tmp_path: Path
) -> None:
    async def scenario(running: Servers) -> None:
        identity = await running.enrol(tmp_path)
        channel = open_channel(running.control_address, credentials=identity.credentials())
        agent = Agent(AgentConfig("laptop-1"), channel)
        runner = asyncio.create_task(agent.run())
        try:
            await wait_until(lambda: agent.applied_epoch == 1)
            [principal] = running.control.admitted
            assert (principal.name, principal.role) == ("laptop-1", Role.AGENT)
            assert principal.authenticated
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            await channel.close(grace=None)

    with_servers(authority, scenario)


def test_an_expired_certificate_is_replaced_by_enrolling_again(
    authority: Authority, tmp_path: Path
) -> None:
    with_servers(authority, lambda running: running.enrol(tmp_path), now=time.time() - 91 * DAY)
    assert load_enrolled(tmp_path, "laptop-1", authority.ca_pem) is None, "expired"
    expired = (tmp_path / "cert.pem").read_bytes()

    async def start_again(running: Servers) -> None:
        with pytest.raises(EnrolmentError, match=r"not enrolled .*pass --enroll-token"):
            await running.enrol(tmp_path, token="")
        fresh = await running.enrol(tmp_path)
        assert fresh.cert_pem != expired and running.enrollment.calls == 1

    with_servers(authority, start_again)


def test_a_certificate_from_a_previous_ca_is_replaced_by_enrolling_again(
    authority: Authority, other_authority: Authority, tmp_path: Path
) -> None:
    async def enrol_with(running: Servers, ca_pem: bytes) -> None:
        identity = await enrol(running.enroll_address, TOKEN, "laptop-1", tmp_path, ca_pem)
        assert running.enrollment.calls == 1
        assert identity.ca_pem == ca_pem

    with_servers(authority, lambda running: enrol_with(running, authority.ca_pem))
    with_servers(other_authority, lambda running: enrol_with(running, other_authority.ca_pem))


def test_a_refused_token_is_one_clear_error_and_stores_nothing(
    authority: Authority, tmp_path: Path
) -> None:
    async def scenario(running: Servers) -> None:
        with pytest.raises(EnrolmentError) as caught:
            await running.enrol(tmp_path, token="kst_x.wrong")
        assert str(caught.value) == (
            f"enrolment refused by {running.enroll_address}: unknown enrolment token"
        )
        assert caught.value.exit_code == EXIT_BAD_INPUT

    with_servers(authority, scenario)
    assert list(tmp_path.iterdir()) == []


def test_a_busy_enrolment_port_is_tried_again_with_backoff(
    authority: Authority, tmp_path: Path
) -> None:
    async def scenario(running: Servers) -> None:
        running.enrollment.busy_for = 2
        identity = await running.enrol(tmp_path)
        assert identity.cert_pem
        assert running.enrollment.calls == 3

    with_servers(authority, scenario)


def test_a_state_dir_holding_another_agent_is_not_reused(
    authority: Authority, tmp_path: Path
) -> None:
    async def scenario(running: Servers) -> None:
        await running.enrol(tmp_path)
        with pytest.raises(
            EnrolmentError, match=r"holds the identity of .*laptop-1.*, not laptop-2"
        ):
            await running.enrol(tmp_path, agent_id="laptop-2")

    with_servers(authority, scenario)


def test_the_enrolment_port_defaults_to_the_next_port() -> None:
    assert default_enroll_target("127.0.0.1:50051") == "127.0.0.1:50052"
    assert default_enroll_target("[::1]:7000") == "[::1]:7001"
    with pytest.raises(EnrolmentError, match="pass --enroll-server"):
        default_enroll_target("control.example")


# ---------------------------------------------------------------- the command line


async def agent_cli_async(*args: str) -> tuple[int, str, str]:
    """The CLI as a subprocess while this event loop keeps serving the fake servers."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "killswitch-agent"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def assert_one_line_error(code: int, stderr: str, expected_code: int, text: str) -> None:
    assert code == expected_code, stderr
    assert "Traceback" not in stderr
    [line] = stderr.strip().splitlines()
    assert line.startswith("killswitch-agent: error: ") and text in line, line


@pytest.mark.parametrize(
    ("args", "text"),
    [
        ([], "--state-dir DIR is required (or --insecure for a development server)"),
        (["--insecure", "--state-dir", "s", "--ca", "c"], "--state-dir, --ca cannot be combined"),
        (["--state-dir", "/nonexistent"], "no CA certificate at /nonexistent/ca.pem: pass --ca"),
    ],
)
def test_run_explains_what_identity_it_needs(args: list[str], text: str) -> None:
    result = agent_cli("run", "--server", "127.0.0.1:1", "--agent-id", "a", *args)
    assert_one_line_error(result.returncode, result.stderr, 2, text)


def test_simulate_shares_connections_only_when_insecure(tmp_path: Path) -> None:
    result = agent_cli(
        "simulate", "--server", "x:1", "--agents", "2", "--connections", "2", "--state-dir", "s"
    )
    assert_one_line_error(result.returncode, result.stderr, 2, "--connections applies only")


def test_run_with_a_refused_token_exits_2(authority: Authority, tmp_path: Path) -> None:
    async def scenario(running: Servers) -> None:
        code, _, err = await agent_cli_async(
            "run",
            "--server",
            running.control_address,
            "--agent-id",
            "laptop-1",
            "--state-dir",
            str(tmp_path / "state"),
            "--enroll-server",
            running.enroll_address,
            "--enroll-token",
            "kst_x.wrong",
            "--ca",
            str(tmp_path / "ca.pem"),
        )
        assert_one_line_error(code, err, 2, "enrolment refused by 127.0.0.1:")
        assert err.strip().endswith("unknown enrolment token")

    (tmp_path / "ca.pem").write_bytes(authority.ca_pem)
    with_servers(authority, scenario)


def test_run_with_nobody_at_the_enrolment_port_exits_4(ca_file: Path, tmp_path: Path) -> None:
    port = free_port()
    result = agent_cli(
        "run",
        "--server",
        f"127.0.0.1:{port - 1}",  # the enrolment port defaults to this + 1
        "--agent-id",
        "laptop-1",
        "--state-dir",
        str(tmp_path / "state"),
        "--enroll-token",
        TOKEN,
        "--ca",
        str(ca_file),
    )
    assert_one_line_error(
        result.returncode, result.stderr, 4, f"cannot reach the enrolment server 127.0.0.1:{port}"
    )


def simulate_args(running: Servers, state: Path, ca_file: Path, *extra: str) -> list[str]:
    return [
        "simulate",
        "--server",
        running.control_address,
        "--enroll-server",
        running.enroll_address,
        "--agents",
        "3",
        "--state-dir",
        str(state),
        "--ca",
        str(ca_file),
        "--report-every",
        "3600",
        *extra,
    ]


def test_simulated_agents_enrol_once_then_each_connects_with_its_own_certificate(
    authority: Authority, ca_file: Path, tmp_path: Path
) -> None:
    state = tmp_path / "fleet"
    ids = ["laptop-00000", "laptop-00001", "laptop-00002"]

    async def run_fleet(running: Servers, *extra: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "killswitch-agent"),
            *simulate_args(running, state, ca_file, *extra),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            await wait_until(lambda: len(running.control.admitted) == 3)
            assert sorted(p.name for p in running.control.admitted) == ids
            assert not running.control.refused
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0
        return out.decode()

    async def scenario(running: Servers) -> None:
        first = await run_fleet(running, "--enroll-token", TOKEN)
        assert "enrolled 3 agents, 0 already were" in first
        assert "over 3 mTLS connections (one per agent)" in first
        assert sorted(p.name for p in state.iterdir()) == ids
        assert all(mode(state / a) == 0o700 for a in ids)
        assert mode(state / ids[0] / "key.pem") == 0o600

        running.control.admitted.clear()
        second = await run_fleet(running)  # no token needed any more
        assert "enrolled 0 agents, 3 already were" in second
        assert running.enrollment.calls == 3

    with_servers(authority, scenario)


def test_simulated_agents_that_cannot_enrol_are_counted_in_one_line(
    authority: Authority, ca_file: Path, tmp_path: Path
) -> None:
    async def scenario(running: Servers) -> None:
        code, _, err = await agent_cli_async(
            *simulate_args(running, tmp_path / "fleet", ca_file, "--enroll-token", "kst_x.no")
        )
        assert_one_line_error(
            code,
            err,
            2,
            f"3 of 3 agents could not enrol: enrolment refused by {running.enroll_address}:"
            " unknown enrolment token (x3)",
        )
        assert not running.control.admitted

    with_servers(authority, scenario)
