"""Security end to end: real certificates, a real mTLS server, the CLI as each role runs it."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from killswitch.v1 import killswitch_pb2 as pb

from control.domain.identity import Role
from control.domain.limits import AGGREGATED_ACTION
from control.pki import load_identity
from control.rpc.authz import GATEWAY_POLICY
from control.rpc.authz import POLICY
from control.rpc.authz import action_name
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulator
from tests.conftest import agent_identity
from tests.conftest import module_server
from tests.conftest import wait_capturing
from tests.conftest import wait_for

ROLE_IDENTITIES = {
    Role.INCIDENT_COMMANDER: "ic-1",
    Role.APPROVER: "approver-1",
    Role.SRE: "sre-1",
    Role.AUTOMATION: "automation-1",
    Role.EMPLOYEE: "employee-1",
    Role.AGENT: "laptop-matrix",
    Role.INGEST: "ingest-1",
    Role.ADMIN: "admin",
}
OUR_METHODS = [
    (f"/{service.full_name}/{method.name}", method)
    for service in pb.DESCRIPTOR.services_by_name.values()
    # Their own ports: the join token is the credential; the gateway serves agents.
    if service.name not in {"Enrollment", "IngestGateway"}
    for method in service.methods
]
STANDARD_METHODS = [
    (f"/{service.full_name}/{method.name}", method)
    for service in (
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    )
    for method in service.methods
]
ALL_METHODS = OUR_METHODS + STANDARD_METHODS


def channel_for(server: ServerProcess, identity_dir: Path) -> grpc.Channel:
    identity = load_identity(identity_dir)
    return grpc.secure_channel(
        server.address,
        grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem),
    )


# Its module-scoped server is built once: the module runs on one worker (Makefile).
pytestmark = pytest.mark.xdist_group("security-e2e")


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with module_server(tmp_path_factory, "security") as server:
        yield server


@pytest.fixture(scope="module")
def channels(shared_server: ServerProcess) -> Iterator[dict[Role, grpc.Channel]]:
    dirs: dict[Role, Path] = {
        role: shared_server.identity(name)
        for role, name in ROLE_IDENTITIES.items()
        if role is not Role.AGENT
    }
    dirs[Role.AGENT] = agent_identity(
        shared_server, ROLE_IDENTITIES[Role.AGENT], shared_server.data_dir.parent
    )
    opened = {role: channel_for(shared_server, d) for role, d in dirs.items()}
    yield opened
    for channel in opened.values():
        channel.close()


def invoke(channel: grpc.Channel, path: str, method: MethodDescriptor) -> grpc.RpcError | None:
    """Call with an empty request, as raw bytes, whatever the method's shape."""
    client_streaming = method.client_streaming
    server_streaming = method.server_streaming
    try:
        if client_streaming and server_streaming:
            list(channel.stream_stream(path, None, None)(iter(()), timeout=3))
        elif server_streaming:  # Health.Watch never ends: a deadline is an answer too
            list(channel.unary_stream(path, None, None)(b"", timeout=3))
        else:
            channel.unary_unary(path, None, None)(b"", timeout=10)
    except grpc.RpcError as exc:
        return exc
    return None


def test_every_rpc_is_in_the_policy() -> None:
    """Deny by default means a new RPC does nothing until someone lists who may call it."""
    assert sorted(path for path, _ in ALL_METHODS) == sorted(POLICY)
    assert len(OUR_METHODS) == sum(p.startswith("/killswitch.v1.") for p in POLICY)
    gateway = pb.DESCRIPTOR.services_by_name["IngestGateway"]
    assert sorted(f"/{gateway.full_name}/{m.name}" for m in gateway.methods) == sorted(
        GATEWAY_POLICY
    )
    assert all(rule.roles == {Role.AGENT} for rule in GATEWAY_POLICY.values())


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
@pytest.mark.parametrize(
    ("path", "method"),
    # Named by the method alone: a descriptor's repr holds its address, which differs
    # between pytest-xdist workers, and they must collect the same tests.
    [pytest.param(path, method, id=path.rsplit("/", 1)[-1]) for path, method in ALL_METHODS],
)
def test_role_matrix(
    channels: dict[Role, grpc.Channel], path: str, method: MethodDescriptor, role: Role
) -> None:
    error = invoke(channels[role], path, method)
    role_denied = (
        error is not None
        and error.code() is grpc.StatusCode.PERMISSION_DENIED
        and "may not call" in (error.details() or "")
    )
    assert role_denied == (role not in POLICY[path].roles), (role, path, error)


def test_readme_role_table_matches_the_policy() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("### Roles and what they may call", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    documented = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        documented[cells[0].strip("`")] = {
            role for role, cell in zip(README_ROLE_COLUMNS, cells[1:], strict=True) if cell == "✔"
        }
    assert documented == {action_name(p): set(rule.roles) for p, rule in POLICY.items()}


README_ROLE_COLUMNS = [
    Role.INCIDENT_COMMANDER,
    Role.APPROVER,
    Role.SRE,
    Role.AUTOMATION,
    Role.EMPLOYEE,
    Role.AGENT,
    Role.INGEST,
    Role.ADMIN,
]


def test_resume_needs_a_second_person(server: ServerProcess, cli: Cli, tmp_path: Path) -> None:
    hold = cli.pause("--all", "--reason", "leak")
    out = cli.ok("resume", "--hold", hold, "--reason", "contained")
    request_id = out.split()[2]

    # The requester cannot approve: not an approver, and not even with an approver
    # certificate in the same name.
    denied = cli.run("approve", request_id)
    assert denied.returncode == 1 and "may not call Operator.ApproveResume" in denied.stderr
    server.issue("ic-1", "approver", server.people / "ic-1-as-approver")
    same_person = cli.as_("ic-1-as-approver").run("approve", request_id)
    assert same_person.returncode == 1 and "a different person must" in same_person.stderr
    assert cli.json("holds")["holds"], "still paused"

    # Only one open request per hold; then a real approver lifts it.
    again = cli.run("resume", "--hold", hold, "--reason", "x")
    assert again.returncode == 1 and "already open" in again.stderr
    approved = cli.as_("approver-2").ok("approve", request_id, "--note", "checked INC")
    assert "lifted at epoch" in approved
    assert cli.json("holds")["holds"] == []
    (done,) = cli.json("requests", "list", "--all")
    assert (done["state"], done["decided_by"]) == ("executed", "approver-2")


def test_an_edit_drops_approvals_and_stale_or_expired_requests_fail(cli: Cli) -> None:
    hold = cli.pause("--all", "--reason", "leak")
    request_id = cli.ok("resume", "--hold", hold, "--reason", "staged", "--for-runbook").split()[2]
    cli.as_("approver-1").ok("approve", request_id)
    (approved,) = cli.json("requests", "list")
    assert approved["state"] == "approved" and len(approved["approvals"]) == 1
    cli.ok("requests", "edit", request_id, "--reason", "staged, wider")
    (edited,) = cli.json("requests", "list")
    assert (edited["state"], edited["approvals"], edited["revision"]) == ("pending", [], 2)
    assert cli.json("holds")["holds"], "a runbook approval lifts nothing by itself"
    # Someone else may not edit it.
    other = cli.as_("approver-1").run("requests", "edit", request_id, "--reason", "x")
    assert other.returncode == 1
    cli.as_("approver-2").ok("deny", request_id, "--note", "not yet")
    assert cli.json("requests", "list") == []

    short = cli.ok("resume", "--hold", hold, "--reason", "r", "--expires-in", "1").split()[2]
    time.sleep(1.5)
    expired = cli.as_("approver-1").run("approve", short)
    assert expired.returncode == 1 and "expired" in expired.stderr


def test_employee_opt_out_survives_a_fleet_resume(server: ServerProcess, cli: Cli) -> None:
    employee = cli.as_("employee-1")
    cli.ok("inventory", "import", str(_inventory(server.data_dir.parent)))
    mine = employee.json("me")
    assert [laptop["agent_id"] for laptop in mine] == ["laptop-emp1"]
    # Another person's laptop is invisible and untouchable.
    refused = employee.run("opt-out", "laptop-other")
    assert refused.returncode == 1 and "does not own" in refused.stderr
    employee.ok("opt-out", "laptop-emp1", "--reason", "I handle patient data")
    (laptop,) = employee.json("me")
    assert laptop["opted_out"] and laptop["mode"] == "PAUSED"
    assert laptop["holds"] == [{"kind": "opt_out", "reason": "I handle patient data"}]

    fleet = cli.pause("--all", "--reason", "incident")
    cli.resume(fleet)
    opt_out = next(h for h in cli.json("holds")["holds"] if h["kind"] == "opt_out")
    no_lift = cli.run("resume", "--hold", opt_out["id"], "--reason", "x")
    assert no_lift.returncode == 1 and "only the laptop's owner" in no_lift.stderr
    assert cli.agents()["laptop-emp1"]["mode"] == "PAUSED"
    assert cli.agents()["laptop-other"]["mode"] == "ALLOWED"
    employee.ok("opt-in", "laptop-emp1")
    assert cli.agents()["laptop-emp1"]["mode"] == "ALLOWED"


def _inventory(where: Path) -> Path:
    path = where / "inventory.csv"
    path.write_text("agent_id,owner\nlaptop-emp1,employee-1\nlaptop-other,employee-2\n")
    return path


def test_an_agent_speaks_only_for_itself(server: ServerProcess, cli: Cli, tmp_path: Path) -> None:
    identity = agent_identity(server, "laptop-honest", tmp_path)
    with channel_for(server, identity) as channel:
        connect = channel.stream_stream(
            "/killswitch.v1.AgentControl/Connect",
            request_serializer=pb.AgentMessage.SerializeToString,
            response_deserializer=pb.ServerMessage.FromString,
        )
        hello = pb.AgentMessage(hello=pb.Hello(agent_id="laptop-victim"))
        with pytest.raises(grpc.RpcError) as info:
            list(connect(iter([hello]), timeout=10))
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
        upload = channel.unary_unary(
            "/killswitch.v1.Ingest/AuthorizeUpload",
            request_serializer=pb.AuthorizeUploadRequest.SerializeToString,
            response_deserializer=pb.AuthorizeUploadResponse.FromString,
        )
        # Not even for itself: only the ingest gateway asks whether a batch may land.
        with pytest.raises(grpc.RpcError) as info:
            upload(pb.AuthorizeUploadRequest(agent_id="laptop-honest"), timeout=10)
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "role agent may not call Ingest.AuthorizeUpload" in (info.value.details() or "")
    entries = cli.as_("sre-1").json("audit")
    claims = [e for e in entries if e["target"] == "" and "laptop-victim" in e["result"]]
    assert {e["action"] for e in claims} == {"AgentControl.Connect"}
    assert all(e["actor"] == "laptop-honest" for e in claims)


def test_certificates_from_elsewhere_are_refused_before_any_handler(
    server: ServerProcess, tmp_path: Path
) -> None:
    from control.pki import initialise

    initialise(tmp_path / "other", now=time.time())
    foreign = load_identity(tmp_path / "other" / "identities" / "admin")
    ours = load_identity(server.identity("ic-1"))
    cases = {
        "wrong CA": grpc.ssl_channel_credentials(ours.ca_pem, foreign.key_pem, foreign.cert_pem),
        "no certificate": grpc.ssl_channel_credentials(ours.ca_pem),
    }
    for what, credentials in cases.items():
        with grpc.secure_channel(server.address, credentials) as channel:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary("/killswitch.v1.Operator/ListHolds", None, None)(
                    b"", timeout=10
                )
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE, what


def test_enrolment_revocation_and_the_live_stream(
    server: ServerProcess, cli: Cli, simulate: Callable[..., Simulator]
) -> None:
    simulate(server, 3, "--id-prefix", "enrolled")
    wait_capturing(cli, 3)
    certs = {c["subject"]: c for c in cli.json("certs", "list")}
    assert {"enrolled-00000", "enrolled-00001", "enrolled-00002"} <= set(certs)
    out = cli.ok("certs", "revoke", "enrolled-00001", "--reason", "stolen laptop")
    # Closed by the revocation itself (not by a later check): the server counts it.
    assert "1 live streams closed" in out
    wait_for(lambda: not cli.agents()["enrolled-00001"]["connected"], 5, "the stream closed")
    # The agent sees its stream end (not a silent dead call), retries with its revoked
    # certificate and is refused: counted, and audited in aggregate within seconds.
    serial = certs["enrolled-00001"]["serial"]
    wait_for(lambda: refused_calls(cli, serial), 25, "the revoked agent refused")
    assert not cli.agents()["enrolled-00001"]["connected"]
    assert cli.agents()["enrolled-00000"]["connected"]
    audit = cli.as_("sre-1").json("audit")
    assert any(e["action"] == "certs.revoke" for e in audit)
    assert sum(e["action"] == "agent.enroll" for e in audit) == 3


def refused_calls(cli: Cli, serial: str) -> list[dict[str, Any]]:
    audit: list[dict[str, Any]] = cli.as_("sre-1").json("audit")
    refusal = f"certificate {serial} has been revoked"
    return [
        e
        for e in audit
        if e["action"] == AGGREGATED_ACTION
        and e["target"] == f"certificate {serial}"
        and refusal in e["detail"]
    ]


def test_spent_and_expired_tokens_are_refused(server: ServerProcess, cli: Cli) -> None:
    import subprocess

    from tests.conftest import BIN

    token = cli.enroll_token(1)
    base = [str(BIN / "killswitch-agent"), "run", "--server", server.address]
    base += ["--enroll-server", server.enroll_address, "--ca", str(server.ca_path)]

    def enrol(agent_id: str, token: str, machine: str = "") -> subprocess.CompletedProcess[str]:
        state = server.data_dir.parent / "states" / (machine or agent_id)
        cmd = [*base, "--agent-id", agent_id, "--state-dir", str(state), "--enroll-token", token]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=False)
        except subprocess.TimeoutExpired as exc:  # enrolled and running: that is success
            return subprocess.CompletedProcess(cmd, 0, str(exc.stdout), str(exc.stderr))

    assert enrol("laptop-a", token).returncode == 0
    spent = enrol("laptop-b", token)
    assert spent.returncode != 0 and "no uses left" in spent.stderr
    assert "Traceback" not in spent.stderr
    forged = enrol("laptop-c", token[:-4] + "AAAA")
    assert forged.returncode != 0 and "unknown enrolment token" in forged.stderr
    short_lived = cli.ok("enroll-token", "create", "--ttl", "1").strip()
    time.sleep(1.5)
    expired = enrol("laptop-d", short_lived)
    assert expired.returncode != 0 and "enrolment token expired" in expired.stderr
    # laptop-a has a certificate: a fresh token on another machine cannot take its identity.
    fresh = cli.enroll_token(1)
    stolen = enrol("laptop-a", fresh, machine="attacker")
    assert stolen.returncode != 0 and "already has a valid certificate" in stolen.stderr


def test_audit_verify_names_the_first_tampered_entry(server: ServerProcess, cli: Cli) -> None:
    for n in range(3):
        cli.pause("--agent", f"laptop-{n}", "--reason", f"case {n}")
    ok = cli.as_("sre-1").ok("audit", "verify")
    assert "audit log intact" in ok
    head = re.search(r"head (\d+:[0-9a-f]{64})", ok)
    assert head is not None
    server.stop()
    db = sqlite3.connect(server.data_dir / "killswitch.db")
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    seq = db.execute("SELECT seq FROM audit_log WHERE reason = 'case 1'").fetchone()[0]
    db.execute("UPDATE audit_log SET reason = 'nothing happened' WHERE seq = ?", (seq,))
    db.commit()
    db.close()
    offline = cli.run("audit", "verify", "--data-dir", str(server.data_dir))
    assert offline.returncode == 1
    assert f"TAMPERED: audit entry {seq}: contents were changed" in offline.stdout


def test_data_dir_is_owner_only(server: ServerProcess) -> None:
    for path in [server.data_dir, *server.data_dir.rglob("*")]:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
