"""Issue 15, findings 4 and 5: least privilege, all the way. A real server each time.

4. A drill runbook pauses capture: automation (or anyone but an incident commander)
   starts one only with a two-person approval of its exact text.
5. Prometheus gates query sources the server was started with, by name: a runbook
   cannot make the server fetch an address of its choosing, redirects are not
   followed, and what a source answers is never shown.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulate
from tests.conftest import StartServer
from tests.conftest import wait_capturing
from tests.conftest import wait_for
from tests.test_security_e2e import channel_for

AGENTS = 10
FLEET_DRILL = """\
name: fleet-drill
pause:
  scope: {all: true}
  reason: drill on the whole fleet
  timeout: 1m
waves:
  - share: 100%
    soak: 1s
"""
SECRET = "SECRET-remote-body-4f2a"
# What each fake source answers (status, body); "redirect" sends callers to "target".
ANSWERS: dict[str, tuple[int, object]] = {
    "target": (200, {"status": "success", "data": {"resultType": "scalar", "result": [0, "0"]}}),
    "failing": (500, SECRET),
    "refusing": (200, {"status": "error", "errorType": "bad_data", "error": SECRET}),
}


def start_runbook_rpc(
    server: ServerProcess, identity: str, text: str, approval: str = ""
) -> grpc.RpcError:
    """StartRunbook as ``identity``, straight over gRPC, expected to be refused."""
    with channel_for(server, server.identity(identity)) as channel:
        stub = pb_grpc.RunbooksStub(channel)
        source = pb.RunbookSource(file_name="drill.yaml", text=text)
        with pytest.raises(grpc.RpcError) as refused:
            stub.StartRunbook(pb.StartRunbookRequest(runbook=source, approval_id=approval))
    error: grpc.RpcError = refused.value
    return error


def plan_runbook_rpc(server: ServerProcess, text: str) -> grpc.RpcError:
    with channel_for(server, server.identity("sre-1")) as channel:
        stub = pb_grpc.RunbooksStub(channel)
        source = pb.RunbookSource(file_name="gated.yaml", text=text)
        with pytest.raises(grpc.RpcError) as refused:
            stub.PlanRunbook(pb.PlanRunbookRequest(runbook=source))
    error: grpc.RpcError = refused.value
    return error


def holds(cli: Cli) -> list[object]:
    active: list[object] = cli.json("holds")["holds"]
    return active


def modes(cli: Cli) -> set[str]:
    return {row["mode"] for row in cli.agents().values()}


def test_only_an_incident_commander_or_an_approval_starts_a_drill(
    start_server: StartServer, simulate: Simulate, tmp_path: Path
) -> None:
    server = start_server()
    cli = Cli(server)
    simulate(server, AGENTS)
    wait_capturing(cli, AGENTS)
    drill = tmp_path / "fleet-drill.yaml"
    drill.write_text(FLEET_DRILL)
    automation = cli.as_("automation-1")

    # Planning is harmless: SRE and automation may.
    for planner in ("sre-1", "automation-1"):
        plan = json.loads(cli.as_(planner).ok("runbook", "plan", str(drill), "--json"))
        assert plan["pause_scope"] == "all agents"

    # Automation alone: refused, and nothing is paused.
    refused = start_runbook_rpc(server, "automation-1", FLEET_DRILL)
    assert refused.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "only an incident commander may start it" in str(refused.details())
    result = automation.run("runbook", "start", str(drill))
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "drill 'fleet-drill' pauses all agents" in result.stderr
    assert holds(cli) == []
    assert json.loads(cli.ok("runbook", "list", "--json")) == []
    assert modes(cli) == {"ALLOWED"}
    denied = [e for e in cli.json("audit") if e["action"] == "Runbooks.StartRunbook"]
    assert denied and all(e["result"].startswith("denied") for e in denied)

    # Automation asks, a different person approves, automation starts that exact text.
    request = automation.ok(
        "runbook", "request", str(drill), "--reason", "quarterly drill", "-q"
    ).strip()
    assert cli.as_("automation-1").run("approve", request).returncode == 1  # not an approver
    cli.as_("approver-1").ok("approve", request)
    edited = tmp_path / "edited.yaml"
    edited.write_text(FLEET_DRILL.replace("drill on the whole fleet", "something else"))
    changed = automation.run("runbook", "start", str(edited), "--approval", request)
    assert changed.returncode == 1 and "the file changed" in changed.stderr
    assert holds(cli) == []

    run_id = automation.ok("runbook", "start", str(drill), "--approval", request, "-q").strip()
    wait_for(lambda: modes(cli) == {"PAUSED"}, 30, "the drill to pause the fleet")
    assert len(holds(cli)) == 1
    # The approval was consumed: it starts one run, not two.
    automation.ok("runbook", "abort", run_id, "--reason", "drill cut short")
    again = automation.run("runbook", "start", str(drill), "--approval", request)
    assert again.returncode == 1 and "executed" in again.stderr

    # An incident commander needs no approval to pause.
    ic_run = cli.ok("runbook", "start", str(drill), "-q").strip()
    assert json.loads(cli.ok("runbook", "status", ic_run, "--json"))["started_by"] == "ic-1"
    assert len(holds(cli)) == 2


class FakePrometheus(http.server.ThreadingHTTPServer):
    """Prometheus sources that misbehave: one redirects, one fails with a secret body."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: dict[str, int] = {}
        self.base = f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FakePrometheus

    def do_GET(self) -> None:
        where = self.path.split("/")[1]
        self.server.hits[where] = self.server.hits.get(where, 0) + 1
        if where == "redirect":
            self.send_response(302)
            self.send_header("Location", f"{self.server.base}/target/api/v1/query")
            self.end_headers()
            return
        status, body = ANSWERS[where]
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: pytest shows what the test asserts."""


@pytest.fixture
def fake_prometheus() -> Iterator[FakePrometheus]:
    fake = FakePrometheus()
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    yield fake
    fake.shutdown()
    fake.server_close()


def gated(source: str, *, url: str = "") -> str:
    where = f"url: {url}, " if url else ""
    return (
        f"name: gated-by-{source}\nhold: from-approval\nwaves:\n  - share: 100%\n"
        f"    soak: 1s\n    timeout: 2s\n    gates:\n"
        f"      prometheus: {{source: {source}, {where}query: up, max: 1}}\n"
    )


def test_prometheus_gates_name_configured_sources_and_never_show_their_answers(
    start_server: StartServer, fake_prometheus: FakePrometheus, tmp_path: Path
) -> None:
    base = fake_prometheus.base
    server = start_server(
        "--runbook-tick",
        "0.2",
        *("--prometheus", f"redirecting={base}/redirect"),
        *("--prometheus", f"failing={base}/failing"),
        *("--prometheus", f"refusing={base}/refusing"),
    )
    cli = Cli(server)
    automation = cli.as_("automation-1")

    # A name the server does not have, and a raw URL: refused before anything runs.
    unknown = plan_runbook_rpc(server, gated("nowhere"))
    assert unknown.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown Prometheus source 'nowhere'" in str(unknown.details())
    assert "failing, redirecting, refusing" in str(unknown.details())
    raw = plan_runbook_rpc(server, gated("failing", url=f"{base}/target"))
    assert raw.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown field 'url'" in str(raw.details())
    path = tmp_path / "nowhere.yaml"
    path.write_text(gated("nowhere"))
    result = cli.as_("sre-1").run("runbook", "plan", str(path))
    assert result.returncode == 2 and "unknown Prometheus source" in result.stderr
    assert fake_prometheus.hits == {}

    hold = cli.pause("--all", "--reason", "incident")

    def run_gated(source: str, hold_id: str) -> dict[str, object]:
        request = cli.ok(
            "resume", "--hold", hold_id, "--reason", "try", "--for-runbook", "-q"
        ).strip()
        cli.as_("approver-1").ok("approve", request)
        path = tmp_path / f"{source}.yaml"
        path.write_text(gated(source))
        run_id = automation.ok("runbook", "start", str(path), "--approval", request, "-q")

        def halted() -> dict[str, object] | None:
            status: dict[str, object] = json.loads(
                cli.ok("runbook", "status", run_id.strip(), "--json")
            )
            return status if status["state"] == "halted" else None

        result: dict[str, object] = wait_for(halted, 30, f"the run gated by {source} to halt")
        return result

    redirected = run_gated("redirecting", hold)
    assert "prometheus 'redirecting' answered HTTP 302; redirects are not followed" in str(
        redirected["halt_reason"]
    )
    assert fake_prometheus.hits.get("redirect", 0) >= 1
    assert "target" not in fake_prometheus.hits

    failed = run_gated("failing", str(redirected["hold_id"]))
    assert "prometheus 'failing' answered HTTP 500" in str(failed["halt_reason"])
    refused = run_gated("refusing", str(failed["hold_id"]))
    assert "prometheus 'refusing' refused the query (bad_data)" in str(refused["halt_reason"])

    # The remote bodies are nowhere a client (or the log shipper) can read them.
    answers = [
        cli.ok("runbook", "list", "--json"),
        cli.ok("runbook", "status", str(failed["id"])),
        cli.ok("audit", "--json"),
        server.log_path.read_text(errors="replace"),
    ]
    assert fake_prometheus.hits["failing"] >= 1 and fake_prometheus.hits["refusing"] >= 1
    assert all(SECRET not in answer for answer in answers)
