"""Runbooks end to end: a real server, enrolled simulated agents, the CLI as operators use it.

Soak times are shortened by rewriting the shipped runbook's durations; everything
else (waves, gates, the two-person approval, the audit) is exactly as shipped.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from control.domain.rollout import Runbook
from control.runbook_file import parse_runbook
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulate
from tests.conftest import StartServer
from tests.conftest import free_port
from tests.conftest import missing_tool
from tests.conftest import wait_for

REPO = Path(__file__).resolve().parent.parent
STAGED = REPO / "runbooks" / "staged-reenable.yaml"
DRILL = REPO / "runbooks" / "canary-drill.yaml"
AGENTS = 200
OPTED_OUT = "laptop-00000"  # owned by employee-1, the identity `killswitch init` creates
TICK = ["--runbook-tick", "0.2"]


def fast_copy(source: Path, target_dir: Path, *, soak: str, timeout: str = "60s") -> Path:
    """The same runbook with short soaks, so a five-wave run takes seconds."""
    document = yaml.safe_load(source.read_text())

    def shorten(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "soak":
                    node[key] = soak
                elif key == "timeout":
                    node[key] = timeout
                else:
                    shorten(value)
        elif isinstance(node, list):
            for item in node:
                shorten(item)

    shorten(document)
    target = target_dir / source.name
    target.write_text(yaml.safe_dump(document, sort_keys=False))
    return target


def run_status(cli: Cli, run_id: str) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(cli.ok("runbook", "status", run_id, "--json"))
    return status


def wait_run(cli: Cli, run_id: str, predicate: Callable[[dict[str, Any]], bool], what: str) -> Any:
    def check() -> dict[str, Any] | None:
        status = run_status(cli, run_id)
        return status if predicate(status) else None

    return wait_for(check, 90, what)


def prometheus_has(url: str, query: str) -> bool:
    address = f"{url}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    try:
        with urllib.request.urlopen(address, timeout=2) as response:
            return bool(json.load(response)["data"]["result"])
    except OSError:
        return False


def waves_of(book: Runbook, agent_ids: Iterable[str]) -> dict[str, int]:
    """Each laptop's wave when the run ranks exactly these (unlabelled) laptops."""
    ids = list(agent_ids)
    cutoffs = book.cutoffs((a, {}) for a in ids)
    return {a: book.wave_of(a, {}, cutoffs) for a in ids}


def audit_actions(cli: Cli) -> list[str]:
    return [e["action"] for e in cli.json("audit")]


class Fleet:
    """A paused fleet with one opted-out laptop and an approved for-runbook resume."""

    def __init__(self, server: ServerProcess, cli: Cli, simulate: Simulate):
        self.server, self.cli = server, cli
        self.sim = simulate(server, AGENTS)
        wait_for(lambda: len(cli.agents()) == AGENTS, 60, "every agent connected")
        cli.as_("employee-1").ok("opt-out", OPTED_OUT)
        self.hold = cli.pause("--all", "--reason", "data leak", "--ticket", "INC-7", "--wait")
        self.request = cli.ok(
            "resume", "--hold", self.hold, "--reason", "leak fixed", "--for-runbook", "-q"
        ).strip()
        cli.as_("approver-1").ok("approve", self.request)

    def start(self, runbook: Path, identity: str = "automation-1") -> str:
        return (
            self.cli.as_(identity)
            .ok("runbook", "start", str(runbook), "--approval", self.request, "-q")
            .strip()
        )

    def modes(self) -> dict[str, str]:
        return {a: row["mode"] for a, row in self.cli.agents().items()}

    def wait_settled(self, *, paused: set[str]) -> None:
        """Every listed agent verified stopped, every other one capturing again."""

        def settled() -> bool:
            for agent_id, row in self.cli.agents().items():
                want = "VERIFIED_STOPPED" if agent_id in paused else "CAPTURING"
                if row["state"] != want:
                    return False
            return True

        wait_for(settled, 60, f"{len(paused)} agents stopped and the rest capturing")


@pytest.fixture
def fleet(start_server: StartServer, simulate: Simulate) -> Fleet:
    server = start_server(*TICK)
    return Fleet(server, Cli(server), simulate)


def test_staged_reenable_runs_every_wave_in_order_and_skips_the_opted_out(
    fleet: Fleet, tmp_path: Path
) -> None:
    runbook = fast_copy(STAGED, tmp_path, soak="2s")
    book = parse_runbook(runbook.read_text(), str(runbook))
    plan = json.loads(
        fleet.cli.ok("runbook", "plan", str(runbook), "--approval", fleet.request, "--json")
    )
    assert [w["target"] for w in plan["waves"]] == [
        f"{share}% of agents" for share in (1, 5, 25, 50, 100)
    ]
    # Exactly ceil(share x 200) laptops through each wave: 2, 10, 50, 100 and 200.
    assert [w["agents"] + w["held_back"] for w in plan["waves"]] == [2, 8, 40, 50, 100]
    members = waves_of(book, fleet.modes())
    opted_out_wave = members[OPTED_OUT]
    assert plan["waves"][opted_out_wave]["held_back"] == 1

    run_id = fleet.start(runbook)
    # While wave 2 soaks, exactly the agents of waves 1-2 are allowed to capture.
    wait_run(fleet.cli, run_id, lambda s: s["current_wave"] == 1, "wave 2")
    allowed = {a for a, mode in fleet.modes().items() if mode == "ALLOWED"}
    assert allowed == {a for a, w in members.items() if w <= 1 and a != OPTED_OUT}

    result = fleet.cli.run("runbook", "status", run_id, "--wait", "--timeout", "120")
    assert result.returncode == 0, result.stdout + result.stderr
    status = run_status(fleet.cli, run_id)
    assert status["state"] == "completed"
    assert [w["state"] for w in status["waves"]] == ["passed"] * 5
    assert all(w["time_to_compliance_seconds"] is not None for w in status["waves"] if w["agents"])
    fleet.wait_settled(paused={OPTED_OUT})
    # The incident hold and the rollout hold are gone; only the opt-out remains.
    assert [h["kind"] for h in fleet.cli.json("holds")["holds"]] == ["opt_out"]
    actions = audit_actions(fleet.cli)
    assert actions.count("runbook.wave_start") == 5
    assert actions.count("runbook.complete") == 1
    # The approval was consumed: it cannot start a second run.
    again = fleet.cli.as_("automation-1").run(
        "runbook", "start", str(runbook), "--approval", fleet.request
    )
    assert again.returncode == 1 and "executed" in again.stderr


def test_a_lie_during_wave_2_halts_the_run_and_repauses_waves_1_and_2(
    fleet: Fleet, simulate: Simulate, tmp_path: Path
) -> None:
    runbook = fast_copy(STAGED, tmp_path, soak="4s")
    book = parse_runbook(runbook.read_text(), str(runbook))
    # A modified agent that acks pauses and captures on: one that stays paused during
    # wave 2 (its own wave comes later), so its lie shows while wave 2 soaks.
    fleet_ids = list(fleet.modes())
    prefix = next(
        p
        for p in (f"liar{k}" for k in range(100))
        if waves_of(book, [*fleet_ids, f"{p}-00000"])[f"{p}-00000"] > 1
    )
    liar_id = f"{prefix}-00000"
    liar = simulate(
        fleet.server, 1, "--id-prefix", prefix, "--fault", "lie=1", "--fault-after", "3600"
    )
    wait_for(
        lambda: fleet.cli.agents().get(liar_id, {}).get("state") == "VERIFIED_STOPPED",
        30,
        "liar paused",
    )

    run_id = fleet.start(runbook)
    wait_run(fleet.cli, run_id, lambda s: s["current_wave"] == 1, "wave 2")
    liar.proc.send_signal(signal.SIGUSR1)  # the lie starts now

    status = wait_run(fleet.cli, run_id, lambda s: s["state"] == "halted", "the run to halt")
    assert "violations 1" in status["halt_reason"]
    assert [w["state"] for w in status["waves"]] == [
        "repaused",
        "failed",
        "pending",
        "pending",
        "pending",
    ]
    # Waves 1-2 are paused again and verified stopped; the liar is caught, not trusted.
    wait_for(
        lambda: all(
            row["state"] == "VERIFIED_STOPPED"
            for a, row in fleet.cli.agents().items()
            if a != liar_id
        ),
        60,
        "every honest agent stopped again",
    )
    assert fleet.cli.agents()[liar_id]["state"] == "VIOLATION"
    rollout = next(h for h in fleet.cli.json("holds")["holds"] if h["kind"] == "rollout")
    assert rollout["id"] == status["hold_id"]
    assert "runbook.halt" in audit_actions(fleet.cli)
    # A halted run is over: nothing to confirm, nothing to abort.
    assert fleet.cli.run("runbook", "advance", run_id).returncode == 1


def test_a_restarted_server_resumes_the_run_without_repeating_a_wave(
    fleet: Fleet, tmp_path: Path
) -> None:
    runbook = fast_copy(STAGED, tmp_path, soak="4s")
    run_id = fleet.start(runbook)
    before = wait_run(fleet.cli, run_id, lambda s: s["current_wave"] == 1, "wave 2")
    fleet.server.kill9()
    fleet.server.start()
    after = run_status(fleet.cli, run_id)
    assert after["current_wave"] in (1, 2)
    assert after["waves"][0]["state"] == "passed"
    assert after["waves"][1]["started_at"] == before["waves"][1]["started_at"]
    result = fleet.cli.run("runbook", "status", run_id, "--wait", "--timeout", "120")
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_status(fleet.cli, run_id)["state"] == "completed"
    assert audit_actions(fleet.cli).count("runbook.wave_start") == 5
    fleet.wait_settled(paused={OPTED_OUT})


def test_a_new_incident_hold_halts_the_run_and_abort_repauses(fleet: Fleet, tmp_path: Path) -> None:
    runbook = fast_copy(STAGED, tmp_path, soak="30s", timeout="120s")
    run_id = fleet.start(runbook)
    wait_run(fleet.cli, run_id, lambda s: s["waves"][0]["state"] == "soaking", "wave 1")
    new_hold = fleet.cli.pause("--selector", "ring=canary", "--reason", "second leak")
    status = wait_run(fleet.cli, run_id, lambda s: s["state"] == "halted", "the run to halt")
    assert new_hold in status["halt_reason"]

    # A second run on the rollout hold, then abort: every wave it enabled is paused again.
    halves = tmp_path / "halves.yaml"
    waves = [{"share": "50%", "soak": "60s", "timeout": "120s"}, {"share": "100%"}]
    halves.write_text(yaml.safe_dump({"name": "halves", "waves": waves}))
    request = fleet.cli.ok(
        "resume", "--hold", status["hold_id"], "--reason", "continue", "--for-runbook", "-q"
    ).strip()
    fleet.cli.as_("approver-2").ok("approve", request)
    second = fleet.cli.ok("runbook", "start", str(halves), "--approval", request, "-q").strip()
    wait_run(fleet.cli, second, lambda s: s["waves"][0]["capturing"] > 10, "wave 1 capturing")
    out = fleet.cli.as_("automation-1").ok("runbook", "abort", second, "--reason", "stop")
    assert "aborted" in out
    fleet.wait_settled(paused=set(fleet.cli.agents()))
    assert run_status(fleet.cli, second)["waves"][0]["state"] == "repaused"


def test_who_may_run_what_and_clear_errors(fleet: Fleet, tmp_path: Path) -> None:
    runbook = fast_copy(STAGED, tmp_path, soak="30s", timeout="60s")
    cli = fleet.cli
    no_approval = cli.as_("automation-1").run("runbook", "start", str(runbook))
    assert no_approval.returncode == 1 and "--approval" in no_approval.stderr
    assert cli.as_("employee-1").run("runbook", "start", str(runbook)).returncode == 1
    assert (
        cli.as_("sre-1")
        .run("runbook", "start", str(runbook), "--approval", fleet.request)
        .returncode
        == 1
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\nwaves:\n  - share: 5%\n    sook: 1m\n")
    bad = cli.run("runbook", "plan", str(broken))
    assert bad.returncode == 2
    assert f"{broken}:4" in bad.stderr and "sook" in bad.stderr
    assert "Traceback" not in bad.stderr
    # The same check without a server, for CI on a repository of runbooks.
    checked = cli.run("runbook", "check", str(STAGED), str(DRILL), str(broken))
    assert checked.returncode == 2
    assert checked.stdout.count(": ok: ") == 2
    assert checked.stderr.strip() == bad.stderr.strip().removeprefix("killswitch: error: ")
    run_id = fleet.start(runbook)
    # Automation runs runbooks; only a person confirms a wave.
    assert cli.as_("automation-1").run("runbook", "advance", run_id).returncode == 1
    assert cli.run("runbook", "advance", run_id).returncode == 1  # nothing to confirm yet
    busy = cli.run("runbook", "start", str(runbook), "--approval", fleet.request)
    assert busy.returncode == 1 and run_id in busy.stderr
    assert [r["id"] for r in cli.json("runbook", "list")] == [run_id]
    cli.ok("runbook", "abort", run_id, "--reason", "test over")


def test_the_canary_drill_pauses_measures_and_reenables(
    start_server: StartServer, simulate: Simulate, tmp_path: Path
) -> None:
    server = start_server(*TICK)
    cli = Cli(server)
    simulate(server, 100)
    wait_for(lambda: len(cli.agents()) == 100, 60, "every agent connected")
    drill = fast_copy(DRILL, tmp_path, soak="1s")
    run_id = cli.ok("runbook", "start", str(drill), "-q").strip()
    status = wait_run(cli, run_id, lambda s: s["state"] == "awaiting-approval", "a verified pause")
    canaries = {a for a, row in cli.agents().items() if row["labels"].get("ring") == "canary"}
    assert len(canaries) == 5
    assert status["pause_time_to_compliance_seconds"] > 0
    assert {a for a, row in cli.agents().items() if row["mode"] == "PAUSED"} == canaries
    request = cli.ok(
        "resume", "--hold", status["hold_id"], "--reason", "drill over", "--for-runbook", "-q"
    ).strip()
    cli.as_("approver-1").ok("approve", request)
    cli.ok("runbook", "advance", run_id, "--approval", request)
    result = cli.run("runbook", "status", run_id, "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    final = run_status(cli, run_id)
    assert final["state"] == "completed"
    assert final["waves"][0]["time_to_compliance_seconds"] > 0
    assert all(row["mode"] == "ALLOWED" for row in cli.agents().values())


def test_a_prometheus_gate_queries_a_real_prometheus(
    start_server: StartServer, simulate: Simulate, tmp_path: Path
) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        missing_tool("prometheus (Debian package prometheus) is not installed")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(*TICK, "--prometheus", f"main={url}")
    fleet = Fleet(server, Cli(server), simulate)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: killswitch\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{fleet.server.http_port}']}}]\n"
    )
    prometheus = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = 'sum(killswitch_agents{state="VIOLATION"})'
        wait_for(lambda: prometheus_has(url, query), 60, "Prometheus to scrape the server")

        def gated(name: str, bounds: dict[str, int]) -> Path:
            gate = {"source": "main", "query": query, **bounds}
            waves = [{"share": "100%", "soak": "1s", "gates": {"prometheus": gate}}]
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump({"name": name, "waves": waves}))
            return path

        # Out of bounds: the wave fails at once and its agents are paused again.
        failing = fleet.start(gated("needs-one", {"min": 1}))
        halted = wait_run(fleet.cli, failing, lambda s: s["state"] == "halted", "a halt")
        assert "prometheus 0 (needs >= 1)" in halted["halt_reason"]

        # Within bounds: a second run on the rollout hold the first one left completes.
        request = fleet.cli.ok(
            "resume", "--hold", halted["hold_id"], "--reason", "retry", "--for-runbook", "-q"
        ).strip()
        fleet.cli.as_("approver-2").ok("approve", request)
        passing = fleet.cli.ok(
            "runbook", "start", str(gated("none", {"max": 0})), "--approval", request, "-q"
        ).strip()
        result = fleet.cli.run("runbook", "status", passing, "--wait", "--timeout", "90")
        assert result.returncode == 0, result.stdout + result.stderr
        gates = {g["name"]: g for g in run_status(fleet.cli, passing)["waves"][0]["gates"]}
        assert gates["prometheus"] == {
            "name": "prometheus",
            "passed": True,
            "observed": "0",
            "limit": "<= 0",
        }
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=10)


def test_plan_counts_exact_never_empty_waves_on_a_small_fleet(
    start_server: StartServer, simulate: Simulate, tmp_path: Path
) -> None:
    """A 1% canary of 50 laptops re-enables one laptop (it used to be none, by chance)."""
    server = start_server()
    cli = Cli(server)
    simulate(server, 50)
    wait_for(lambda: len(cli.agents()) == 50, 60, "every agent connected")
    runbook = tmp_path / "exact.yaml"
    runbook.write_text(
        "name: exact\nseed: exact-1\nwaves:\n"
        "  - {name: canary, share: 1%}\n"
        "  - {name: early, share: 2%, min_agents: 3}\n"
        "  - {name: quarter, share: 25%}\n"
        "  - {name: rest, share: 100%}\n"
    )
    plan = json.loads(cli.ok("runbook", "plan", str(runbook), "--json"))
    # ceil(1% x 50) = 1; 2% would be 1, but min_agents asks 3 more; ceil(25% x 50) = 13.
    assert [w["agents"] for w in plan["waves"]] == [1, 3, 9, 37]
    text = cli.ok("runbook", "plan", str(runbook))
    assert "canary" in text and " 37 " in text
