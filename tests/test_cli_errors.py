"""Every user error is one line on stderr with a non-zero exit, never a traceback."""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.pki import load_identity
from tests.conftest import BIN
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import free_port
from tests.conftest import module_server


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "killswitch"), *args], capture_output=True, text=True, timeout=60, check=False
    )


# Its module-scoped server is built once: the module runs on one worker (Makefile).
pytestmark = pytest.mark.xdist_group("cli-errors")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the tests that only ask it questions and read its refusals: a
    server costs a second or more of start-up, and this module used to start 17."""
    with module_server(tmp_path_factory, "cli-errors") as server:
        yield server


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert text in lines[0], lines[0]


def test_a_bad_minimum_agent_version_is_refused_before_serving(tmp_path: Path) -> None:
    result = run("serve", "--data-dir", str(tmp_path), "--min-agent-version", "latest")
    assert_one_line_error(result, 2, "not a version: 'latest'")


def test_unreachable_server(tmp_path: Path) -> None:
    from control.pki import initialise

    initialise(tmp_path, now=time.time())
    identity = str(tmp_path / "identities" / "admin")
    result = run("status", "--server", f"127.0.0.1:{free_port()}", "--identity", identity)
    assert_one_line_error(result, 4, "cannot reach the control server")


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (
            ["resume", "--hold", "hold-doesnotexist", "--reason", "x"],
            1,
            "unknown hold 'hold-doesnotexist'",
        ),
        (["approve", "resume-nope"], 1, "unknown resume request 'resume-nope'"),
        (["enroll-token", "create", "--uses", "0"], 2, "must be a whole number"),
        (["certs", "revoke", "nobody"], 1, "no certificate with subject or serial"),
        (["audit", "verify", "--anchor", "12"], 2, "bad --anchor"),
        (["pause", "--selector", "region", "--reason", "x"], 2, "bad selector"),
        (["pause", "--selector", "region=eu,region=us", "--reason", "x"], 2, "given twice"),
        (["pause", "--selector", "re gion=eu", "--reason", "x"], 2, "invalid label key"),
        (["pause", "--all", "--reason", "   "], 2, "reason is required"),
        (["pause", "--agent", "bad id!", "--reason", "x"], 2, "invalid agent id"),
        (["agents", "--state", "SLEEPING"], 2, "unknown state 'SLEEPING'"),
        (["inventory", "import", "/nonexistent.csv"], 2, "cannot read /nonexistent.csv"),
    ],
)
def test_bad_input_against_a_live_server(
    live: ServerProcess, args: list[str], code: int, text: str
) -> None:
    assert_one_line_error(Cli(live).run(*args), code, text)


def test_server_rejects_what_the_cli_would_have_caught(live: ServerProcess) -> None:
    """The server validates too: other clients are not trusted to have checked."""
    import grpc
    from killswitch.v1 import killswitch_pb2 as pb
    from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

    identity = load_identity(live.identity("ic-1"))
    credentials = grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem)
    with grpc.secure_channel(live.address, credentials) as channel:
        stub = pb_grpc.OperatorStub(channel)
        for request, text in [
            (pb.CreateHoldRequest(scope=pb.Scope(all=True), reason=""), "reason is required"),
            (pb.CreateHoldRequest(reason="x"), "a scope is required"),
            (
                pb.CreateHoldRequest(scope=pb.Scope(selector=pb.Selector()), reason="x"),
                "at least one k=v",
            ),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                stub.CreateHold(request, timeout=10)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert text in (info.value.details() or "")


def test_lifting_a_hold_twice_is_refused(live: ServerProcess) -> None:
    cli = Cli(live)
    hold_id = cli.pause("--all", "--reason", "x")
    cli.resume(hold_id)
    assert_one_line_error(
        cli.run("resume", "--hold", hold_id, "--reason", "x"), 1, "already lifted"
    )


def test_archived_history_is_named_in_one_line(cli: Cli, server: ServerProcess) -> None:
    """A hold and its request archived by history compaction (marked as compaction marks
    them, while the server is down): named by id, the answer says so, in one line."""
    hold_id = cli.pause("--all", "--reason", "x")
    request_id = cli.resume(hold_id)
    server.stop()
    db = sqlite3.connect(server.data_dir / "killswitch.db")
    with db:
        db.execute("UPDATE holds SET archived_at = lifted_at")
        db.execute("UPDATE resume_requests SET archived_at = decided_at")
    db.close()
    server.start()

    archived = cli.run("resume", "--hold", hold_id, "--reason", "x")
    assert_one_line_error(archived, 1, f"hold {hold_id} was lifted on ")
    assert "by approver-1 (epoch 2) and archived" in archived.stderr
    archived = cli.as_("approver-1").run("approve", request_id)
    assert_one_line_error(archived, 1, f"resume request {request_id} for hold {hold_id} was")
    assert "was executed on " in archived.stderr and "and archived" in archived.stderr
    assert request_id not in cli.ok("requests", "list", "--all")


@pytest.mark.parametrize("value", ["60", "-1", "nan", "a week"])
def test_serve_refuses_a_bad_history_retention(tmp_path: Path, value: str) -> None:
    result = run("serve", "--insecure", "--data-dir", str(tmp_path), "--history-retention", value)
    assert_one_line_error(result, 2, f"argument --history-retention: {value!r}")
    assert not (tmp_path / "killswitch.db").exists()


def test_no_identity_is_a_one_line_error(live: ServerProcess) -> None:
    result = run("status", "--server", live.address, "--identity", "")
    assert_one_line_error(result, 2, "no identity")
    result = run("status", "--server", live.address, "--identity", "/nonexistent")
    assert_one_line_error(result, 2, "/nonexistent")


def test_bad_inventory_line_names_file_and_line(live: ServerProcess, tmp_path: Path) -> None:
    cli = Cli(live)
    bad = tmp_path / "inv.csv"
    bad.write_text("agent_id,region\nok-1,eu\nbad id,eu\n")
    assert_one_line_error(cli.run("inventory", "import", str(bad)), 2, f"{bad}:3: invalid agent id")
    assert cli.json("status")["agents"]["total"] == 0  # not even the good line


def test_serve_refuses_non_loopback_without_mtls(tmp_path: Path) -> None:
    result = run("serve", "--insecure", "--data-dir", str(tmp_path), "--grpc", "0.0.0.0:50051")
    assert_one_line_error(result, 2, "may only listen on loopback")


def test_serve_without_a_ca_says_to_run_init(tmp_path: Path) -> None:
    result = run("serve", "--data-dir", str(tmp_path), "--grpc", f"127.0.0.1:{free_port()}")
    assert_one_line_error(result, 1, "killswitch init")


def test_serve_reports_a_port_in_use(live: ServerProcess, tmp_path: Path) -> None:
    result = run(
        "serve",
        "--insecure",
        "--data-dir",
        str(tmp_path / "other"),
        "--grpc",
        live.address,
        "--http",
        f"127.0.0.1:{free_port()}",
    )
    assert_one_line_error(result, 1, f"cannot listen on {live.address} for gRPC")
