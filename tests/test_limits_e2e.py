"""Limits at every door, against a real server: floods are refused early and cost the
audit log a handful of aggregated entries whose counts add up to the calls refused."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections import Counter
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from killswitch.v1 import killswitch_pb2 as pb

from agent_stub.identity import enrol
from control.domain.limits import AGGREGATED_ACTION
from control.pki import load_identity
from control.pki import principal_from_pem
from control.refusals import REFUSAL_BUDGET_BURST
from control.rpc.enrolment_gate import ENROL_BURST
from tests.conftest import BIN
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulator
from tests.conftest import wait_capturing

ENROLL = "/killswitch.v1.Enrollment/Enroll"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
CREATE_HOLD = "/killswitch.v1.Operator/CreateHold"


def audit(cli: Cli) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = cli.as_("sre-1").json("audit")
    return entries


def aggregated_calls(entries: list[dict[str, Any]], target: str) -> int:
    """How many refused calls the aggregated entries for ``target`` count."""
    total = 0
    for entry in entries:
        if entry["action"] == AGGREGATED_ACTION and entry["target"] == target:
            counted = re.fullmatch(r"denied: (\d+) calls", entry["result"])
            assert counted, entry
            total += int(counted.group(1))
    return total


def restarted(server: ServerProcess) -> None:
    """A clean stop writes what was counted; the next start serves the audit log."""
    server.stop()
    server.start()


def secure_channel(server: ServerProcess, identity_dir: Path) -> grpc.Channel:
    identity = load_identity(identity_dir)
    return grpc.secure_channel(
        server.address,
        grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem),
    )


def enrolment_channel(server: ServerProcess) -> grpc.Channel:
    """The enrolment port as anyone reaches it: server-authenticated TLS, no certificate."""
    credentials = grpc.ssl_channel_credentials(server.ca_path.read_bytes())
    # A connection of its own: the port's limit of streams is per connection.
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    return grpc.secure_channel(server.enroll_address, credentials, own_connection)


def enroll_method(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable[Any, Any]:
    return channel.unary_unary(
        ENROLL,
        request_serializer=pb.EnrollRequest.SerializeToString,
        response_deserializer=pb.EnrollResponse.FromString,
    )


def codes_of(calls: Sequence[grpc.Future[Any]]) -> Counter[grpc.StatusCode]:
    """The status each call ended with (a future's exception is its RpcError)."""
    codes: Counter[grpc.StatusCode] = Counter()
    for call in calls:
        error = call.exception()
        codes[grpc.StatusCode.OK if error is None else error.code()] += 1  # type: ignore[attr-defined]
    return codes


def refused_code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_an_enrolment_flood_is_refused_early_and_audited_in_aggregate(
    server: ServerProcess, cli: Cli
) -> None:
    before = len(audit(cli))
    # Under gRPC's own limit of pending calls (1000), past which it cancels calls
    # before they reach the server's code, where they could be counted.
    flood = 800
    # Over several connections, as a flooding client would spread its calls: one
    # connection's streams at once, each refusal held in the tarpit, is a slow flood.
    connections = 8
    channels = [enrolment_channel(server) for _ in range(connections)]
    try:
        forged = [
            pb.EnrollRequest(token="kst_forged.secret", agent_id=f"laptop-{n}", csr_pem="no CSR")
            for n in range(flood)
        ]
        calls = [
            enroll_method(channels[n % connections]).future(request, timeout=60)
            for n, request in enumerate(forged)
        ]
        # Meanwhile the incident commander is served.
        cli.pause("--agent", "laptop-under-flood", "--reason", "enrolment flood")
        codes = codes_of(calls)
    finally:
        for channel in channels:
            channel.close()
    assert sum(codes.values()) == flood and grpc.StatusCode.OK not in codes, codes
    # UNAVAILABLE: streams past the port's HTTP/2 limit, refused by the transport before
    # any of the server's code ran (nothing to count); RESOURCE_EXHAUSTED: the limits.
    refused_early = codes[grpc.StatusCode.RESOURCE_EXHAUSTED] + codes[grpc.StatusCode.UNAVAILABLE]
    assert refused_early > flood // 2, codes
    restarted(server)
    new = audit(cli)[before:]
    assert aggregated_calls(new, "127.0.0.1") == flood - codes[grpc.StatusCode.UNAVAILABLE]
    # (certs.issue: the incident commander's identity, issued when the test first used it)
    others = [e["action"] for e in new if e["action"] not in {AGGREGATED_ACTION, "certs.issue"}]
    assert others == ["hold.create"]
    aggregated = [e for e in new if e["action"] == AGGREGATED_ACTION]
    # One per source per 10 s interval; the tarpit spreads the flood over a few intervals.
    assert len(aggregated) <= 10, "a handful of aggregated entries, not one per refused call"


def test_a_revoked_certificate_is_refused_in_aggregate_without_an_entry_per_call(
    server: ServerProcess, cli: Cli, tmp_path: Path
) -> None:
    state = tmp_path / "laptop-stolen"
    identity = asyncio.run(
        enrol(
            server.enroll_address,
            cli.enroll_token(1),
            "laptop-stolen",
            state,
            server.ca_path.read_bytes(),
        )
    )
    serial = principal_from_pem(identity.cert_pem).serial
    cli.ok("certs", "revoke", "laptop-stolen", "--reason", "stolen laptop")
    before = len(audit(cli))
    calls = 60
    with grpc.secure_channel(server.address, identity.credentials()) as channel:
        check = channel.unary_unary(HEALTH_CHECK, None, None)
        codes = codes_of([check.future(b"", timeout=30) for _ in range(calls)])
    assert codes == {grpc.StatusCode.UNAUTHENTICATED: calls}
    cli.pause("--agent", "laptop-stolen", "--reason", "it was stolen")
    restarted(server)
    new = audit(cli)[before:]
    assert not [e for e in new if "revoked" in e["result"]], "no entry per refused call"
    assert aggregated_calls(new, f"certificate {serial}") == calls
    assert len(new) <= 3


def test_refusals_past_an_identitys_budget_are_counted_not_written_one_by_one(
    server: ServerProcess, cli: Cli
) -> None:
    before = len(audit(cli))
    calls = 40
    with secure_channel(server, server.identity("employee-1")) as channel:
        create_hold = channel.unary_unary(CREATE_HOLD, None, None)
        codes = Counter(refused_code(lambda: create_hold(b"", timeout=30)) for _ in range(calls))
    assert codes == {grpc.StatusCode.PERMISSION_DENIED: calls}
    restarted(server)
    new = [e for e in audit(cli)[before:] if e["actor"] == "employee-1"]
    one_by_one = [e for e in new if e["action"] == "Operator.CreateHold"]
    # The budget, and what it refilled while the calls ran: far from one entry per call.
    assert REFUSAL_BUDGET_BURST <= len(one_by_one) < calls // 2
    assert all(e["result"].startswith("denied: role employee") for e in one_by_one)
    serial = principal_from_pem(load_identity(server.identity("employee-1")).cert_pem).serial
    assert len(one_by_one) + aggregated_calls(new, serial) == calls


def test_a_fleet_enrolling_from_one_address_is_not_rate_limited(
    server: ServerProcess, cli: Cli, simulate: Callable[..., Simulator]
) -> None:
    """More agents than the per-source burst enrol from 127.0.0.1: each call that enrols
    gives its token back, so only failing callers run out."""
    agents = ENROL_BURST + 16
    simulate(server, agents, "--id-prefix", "nat")
    wait_capturing(cli, agents, timeout=90)
    audit_log = audit(cli)
    assert sum(e["action"] == "agent.enroll" for e in audit_log) == agents
    assert not [e for e in audit_log if e["action"] == AGGREGATED_ACTION]


def test_an_undecodable_enrolment_is_invalid_argument_not_a_crash(server: ServerProcess) -> None:
    """Found by bench/fuzz_campaign.py: the enrolment port answered gRPC's UNKNOWN."""
    with enrolment_channel(server) as channel:
        enroll = channel.unary_unary(ENROLL, None, None)  # raw bytes out and back
        for garbage in (b"y", b"\x1a\x04ic", b"\n@aaaaaaaae\xe5\taaaa"):
            with pytest.raises(grpc.RpcError) as refused:
                enroll(garbage, timeout=10)
            error: Any = refused.value
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
            assert "does not parse" in error.details()


def test_the_enrolment_limit_per_source_is_set_by_serve_options(
    start_server: Callable[..., ServerProcess],
) -> None:
    """``--enrol-burst 3 --enrol-rate 0.01``: three failing calls reach the token check,
    the fourth is refused at the door (a lab or a fuzz campaign raises them instead)."""
    server = start_server("--enrol-burst", "3", "--enrol-rate", "0.01")
    with enrolment_channel(server) as channel:
        enroll = enroll_method(channel)
        forged = pb.EnrollRequest(token="kst_forged.secret", agent_id="laptop-1", csr_pem="x")
        codes = [refused_code(lambda: enroll(forged, timeout=10)) for _ in range(4)]
    assert grpc.StatusCode.RESOURCE_EXHAUSTED not in codes[:3], codes
    assert codes[3] is grpc.StatusCode.RESOURCE_EXHAUSTED, codes


@pytest.mark.parametrize("flag, value", [("--enrol-rate", "0"), ("--enrol-burst", "many")])
def test_a_bad_enrolment_limit_is_one_line(flag: str, value: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(BIN / "killswitch"), "serve", "--data-dir", str(tmp_path), flag, value],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and flag in done.stderr, done.stderr
