"""Outbound webhooks against a real HTTP receiver: signed, retried, durable across restarts."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from control.domain.audit import AuditEntry
from control.domain.audit import AuditRecord
from control.webhooks.config import parse_webhook
from control.webhooks.events import event_of
from tests.conftest import BIN
from tests.conftest import Cli
from tests.conftest import Simulate
from tests.conftest import StartServer
from tests.conftest import free_port
from tests.conftest import wait_for
from tests.test_runbook_e2e import STAGED
from tests.test_runbook_e2e import fast_copy

SECRET = b"s3cret-for-the-webhook-tests-0123456789"


class Receiver:
    """A chat tool's incoming-webhook endpoint: records every POST, answers 200."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers.items()), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None: ...

        self.http = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.http.server_address[1]
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in list(self.requests)]

    def kinds(self) -> list[str]:
        return [event["event"] for event in self.events()]

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "webhook.secret"
    path.write_bytes(SECRET + b"\n")
    return path


def verify(headers: dict[str, str], body: bytes) -> bool:
    """What a receiver does: recompute HMAC-SHA256 over "t." + body."""
    fields = dict(part.split("=", 1) for part in headers["X-Killswitch-Signature"].split(","))
    expected = hmac.new(SECRET, f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"])


def webhook_args(url: str, secret_file: Path, events: str = "") -> list[str]:
    option = f"chat={url}" + (f",events={events}" if events else "")
    return ["--webhook", option, "--webhook-secret-file", str(secret_file)]


def test_pause_resume_approve_and_violation_arrive_signed(
    start_server: StartServer, simulate: Simulate, receiver: Receiver, secret_file: Path
) -> None:
    server = start_server(*webhook_args(receiver.url, secret_file))
    cli = Cli(server)
    # One of two agents is a modified one that captures on after acking the pause.
    simulate(server, 2, "--fault", "lie=0.5", "--fault-after", "0")
    wait_for(lambda: len(cli.agents()) == 2, 30, "two agents")
    hold_id = cli.pause("--all", "--reason", "breach at vendor", "--ticket", "INC-42")
    wait_for(lambda: "violation" in receiver.kinds(), 30, "the violation event")
    cli.resume(hold_id, "--ticket", "INC-42")
    wait_for(lambda: "resume_approved" in receiver.kinds(), 20, "the approval event")

    kinds = receiver.kinds()
    assert kinds.index("pause_issued") < kinds.index("resume_requested")
    assert kinds.index("resume_requested") < kinds.index("resume_approved")
    for headers, body in receiver.requests:
        assert verify(headers, body), headers
        assert headers["X-Killswitch-Delivery"] == json.loads(body)["id"]
    pause = next(e for e in receiver.events() if e["event"] == "pause_issued")
    assert pause["actor"] == "ic-1" and pause["ticket"] == "INC-42"
    assert pause["text"].startswith("killswitch: Capture PAUSED by ic-1")
    assert "breach at vendor" in pause["text"]
    approved = next(e for e in receiver.events() if e["event"] == "resume_approved")
    assert approved["actor"] == "approver-1"
    ids = [e["id"] for e in receiver.events()]
    assert len(ids) == len(set(ids)), "every event is delivered once while the receiver is up"


def test_events_filter_and_a_tampered_body_fails_verification(
    start_server: StartServer, receiver: Receiver, secret_file: Path
) -> None:
    server = start_server(*webhook_args(receiver.url, secret_file, "resume_requested"))
    cli = Cli(server)
    hold_id = cli.pause("--all", "--reason", "drill")
    cli.ok("resume", "--hold", hold_id, "--reason", "all clear")
    wait_for(lambda: receiver.kinds() == ["resume_requested"], 20, "only the resume request")
    headers, body = receiver.requests[0]
    assert verify(headers, body)
    assert not verify(headers, body.replace(b"all clear", b"all clean"))


def test_the_fleet_turning_compliant_under_a_pause_is_announced_once(
    start_server: StartServer, simulate: Simulate, receiver: Receiver, secret_file: Path
) -> None:
    server = start_server(*webhook_args(receiver.url, secret_file, "fleet_compliant"))
    cli = Cli(server)
    simulate(server, 2)
    wait_for(lambda: len(cli.agents()) == 2, 30, "two agents")
    assert receiver.kinds() == [], "no pause, nothing to announce"
    cli.pause("--all", "--reason", "drill", "--ticket", "DRILL-9")
    wait_for(lambda: receiver.kinds() == ["fleet_compliant"], 30, "the compliant fleet")
    compliant = receiver.events()[0]
    assert compliant["ticket"] == "DRILL-9"
    assert "2 laptops, every paused one proven stopped" in compliant["text"]
    assert cli.json("status")["compliant"] is True
    time.sleep(3)  # several sender rounds: still one announcement for this epoch
    assert receiver.kinds() == ["fleet_compliant"]


def test_undelivered_events_survive_a_restart_and_arrive_once_the_receiver_is_up(
    start_server: StartServer, secret_file: Path
) -> None:
    port = free_port()  # nobody listens here yet
    server = start_server(*webhook_args(f"http://127.0.0.1:{port}/hook", secret_file))
    Cli(server).pause("--all", "--reason", "breach at vendor", "--ticket", "INC-42")
    wait_for(lambda: "webhook_not_delivered" in server.log(), 20, "a failed delivery")
    server.stop()
    receiver = Receiver(port)
    try:
        server.start()
        wait_for(lambda: "pause_issued" in receiver.kinds(), 30, "the queued event")
        Cli(server).pause("--all", "--reason", "second", "--ticket", "INC-43")
        wait_for(lambda: receiver.kinds().count("pause_issued") == 2, 20, "the next event")
        ids = [e["id"] for e in receiver.events()]
        assert len(ids) == len(set(ids)), ids
    finally:
        receiver.close()


def test_webhooks_on_postgresql(
    start_server: StartServer, receiver: Receiver, secret_file: Path, pg_dsn: str
) -> None:
    server = start_server("--database", pg_dsn, *webhook_args(receiver.url, secret_file))
    Cli(server).pause("--all", "--reason", "drill", "--ticket", "PG-1")
    wait_for(lambda: receiver.kinds() == ["pause_issued"], 20, "the pause event")
    assert verify(*receiver.requests[0])


@pytest.mark.parametrize(
    ("option", "error"),
    [
        ("chat=ftp://x/y", "must be http:// or https://"),
        ("chat=http://127.0.0.1/x,events=pause_issued,nope", "unknown webhook event(s) nope"),
        ("chat=http://127.0.0.1/x,colour=red", "expected events= or secret-file="),
        ("=http://x", "expected NAME=URL"),
    ],
)
def test_bad_webhook_options_are_refused(option: str, error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)")):
        parse_webhook(option)


def test_events_run_on_after_events_until_the_next_option() -> None:
    spec = parse_webhook("chat=https://h/x,events=violation,runbook_halt,secret-file=/f")
    assert spec.events == {"violation", "runbook_halt"}
    assert spec.secret_file == "/f"


def test_a_webhook_without_a_secret_stops_serve_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(BIN / "killswitch"),
            "serve",
            "--insecure",
            "--data-dir",
            str(tmp_path),
            "--webhook",
            "chat=http://127.0.0.1:9/x",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "has no secret" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("action", "target", "result", "event"),
    [
        ("hold.create", "hold-1 incident all agents", "ok", "pause_issued"),
        ("hold.create", "opt-out-laptop-1 opt_out agents laptop-1", "ok", ""),
        ("hold.create", "hold-2 rollout all agents", "ok", ""),
        ("resume.deny", "req-1", "ok", "resume_denied"),
        ("resume.approve", "req-1", "denied: the requester cannot approve", ""),
        ("agent.violation", "laptop-1", "violation", "violation"),
        ("runbook.wave_start", "run-1", "ok", "runbook_wave"),
        ("runbook.halt", "run-1", "halted", "runbook_halt"),
        ("runbook.abort", "run-1", "ok", "runbook_halt"),
        ("runbook.abort", "run-1", "denied: not an incident commander", ""),
        ("certs.revoke", "laptop-1", "ok", ""),
    ],
)
def test_which_audited_actions_are_webhook_events(
    action: str, target: str, result: str, event: str
) -> None:
    record = AuditRecord(1.0, "ic-1", "incident-commander", action, target, result=result)
    assert event_of(AuditEntry(5, record, "0" * 64, "1" * 64)) == event


def test_runbook_waves_and_an_abort_are_announced(
    start_server: StartServer,
    simulate: Simulate,
    receiver: Receiver,
    secret_file: Path,
    tmp_path: Path,
) -> None:
    events = "runbook_wave,runbook_halt"
    server = start_server("--runbook-tick", "0.2", *webhook_args(receiver.url, secret_file, events))
    cli = Cli(server)
    simulate(server, 20)
    wait_for(lambda: len(cli.agents()) == 20, 30, "every agent connected")
    hold_id = cli.pause("--all", "--reason", "data leak", "--ticket", "INC-7", "--wait")
    request = cli.ok(
        "resume", "--hold", hold_id, "--reason", "leak fixed", "--for-runbook", "-q"
    ).strip()
    cli.as_("approver-1").ok("approve", request)
    runbook = fast_copy(STAGED, tmp_path, soak="120s", timeout="300s")  # stays in its first wave
    run_id = cli.ok("runbook", "start", str(runbook), "--approval", request, "-q").strip()
    wait_for(lambda: "runbook_wave" in receiver.kinds(), 30, "the first wave")
    cli.ok("runbook", "abort", run_id, "--reason", "drill over")
    wait_for(lambda: "runbook_halt" in receiver.kinds(), 20, "the abort")
    wave = next(e for e in receiver.events() if e["event"] == "runbook_wave")
    assert "wave 1/" in wave["detail"]
    halt = next(e for e in receiver.events() if e["event"] == "runbook_halt")
    assert halt["target"] == run_id and halt["reason"] == "drill over"
