"""Runbook runs on the dashboard: the JSON API, who may read it, and the live overview panel.

A real server and simulated fleet; the run is started and confirmed with the CLI exactly
as an operator would, from a two-wave runbook with one-second soaks whose second wave
waits for a person, so the test can look at the run while it waits.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulator
from tests.conftest import wait_capturing
from tests.conftest import wait_for
from tests.dashboard_support import Http
from tests.dashboard_support import session_for
from tests.test_dashboard_browser import ARTIFACTS
from tests.test_dashboard_browser import CHROMIUM
from tests.test_dashboard_browser import collect_problems
from tests.test_dashboard_browser import require_browser
from tests.test_dashboard_browser import sign_in

AGENTS = 12
WAVE_1 = "<i>first</i> & half"
# The seed puts employee-1's laptop-00000 in wave 1 of the 12: re-enabled when the
# employee looks, so no rollout hold (whose reason names the run) is on their page.
RUNBOOK = f"""\
name: dashboard-drill
seed: drill-1
waves:
  - name: "{WAVE_1}"
    share: 50%
    soak: 1s
    timeout: 60s
  - name: everyone
    share: 100%
    soak: 1s
    timeout: 60s
    confirm: true
"""
# A drill pauses its own scope first, so it starts without an approval.
PAUSE_DRILL = """\
name: dashboard-pause-drill
pause:
  scope:
    selector: {ring: canary}
  reason: drill
waves:
  - name: canary ring
    share: 100%
    soak: 1s
"""
GATES = ["capturing", "violations", "nacks", "overdue"]


@dataclass
class Drill:
    """A paused fleet and an approved ``resume --for-runbook`` of its hold."""

    server: ServerProcess
    cli: Cli
    hold: str
    request: str
    runbook: Path

    def start(self) -> str:
        args = ("runbook", "start", str(self.runbook), "--approval", self.request, "-q")
        return self.cli.ok(*args).strip()


@pytest.fixture
def drill(
    start_server: Callable[..., ServerProcess],
    simulate: Callable[..., Simulator],
    tmp_path: Path,
) -> Drill:
    server = start_server("--runbook-tick", "0.2")
    cli = Cli(server)
    simulate(server, AGENTS)
    wait_capturing(cli, AGENTS, timeout=60)
    hold = cli.pause("--all", "--reason", "data leak", "--ticket", "INC-5", "--wait")
    request = cli.ok(
        "resume", "--hold", hold, "--reason", "leak fixed", "--for-runbook", "-q"
    ).strip()
    cli.as_("approver-1").ok("approve", request)
    runbook = tmp_path / "two-waves.yaml"
    runbook.write_text(RUNBOOK)
    return Drill(server, cli, hold, request, runbook)


def wait_state(browser: Http, run_id: str, state: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        run: dict[str, Any] = browser.json(f"/api/runs/{run_id}")["run"]
        return run if run["state"] == state else None

    found: dict[str, Any] = wait_for(reached, 60, f"run {run_id} {state}")
    return found


def cli_status(cli: Cli, run_id: str) -> Any:
    return json.loads(cli.ok("runbook", "status", run_id, "--json"))


def test_operators_read_runs_as_the_cli_prints_them_and_employees_do_not(drill: Drill) -> None:
    sre = session_for(drill.server, "sre-1")
    assert sre.json("/api/runs")["runs"] == []
    assert sre.json("/api/summary")["summary"]["runbook"] is None
    assert 'id="run-empty"' in sre.get("/").text

    run_id = drill.start()
    run = wait_state(sre, run_id, "awaiting-confirmation")
    assert [w["state"] for w in run["waves"]] == ["passed", "pending"]
    assert (run["runbook"], run["current_wave"], run["started_by"]) == (
        "dashboard-drill",
        0,
        "ic-1",
    )
    assert (run["lifted_hold_id"], run["approval_id"]) == (drill.hold, drill.request)
    assert run["next_step"] == f"killswitch runbook advance {run_id}"
    first = run["waves"][0]
    assert [g["name"] for g in first["gates"]] == GATES and all(g["passed"] for g in first["gates"])
    assert first["capturing"] == first["agents"] and first["time_to_compliance_seconds"] > 0
    assert [w["target"] for w in run["waves"]] == ["50% of agents", "100% of agents"]
    # The same run, field for field, as the CLI prints it (a waiting run does not move).
    assert run == cli_status(drill.cli, run_id)
    assert sre.json("/api/runs")["runs"] == [run]
    assert sre.json("/api/summary")["summary"]["runbook"] == run
    for identity in ("ic-1", "approver-1"):
        assert session_for(drill.server, identity).json(f"/api/runs/{run_id}")["run"] == run
    assert sre.get("/api/runs/run-0000000000").status == 404

    # The page without JavaScript: state, one cell per wave (the current one marked),
    # the current wave's gates, the next step; the runbook's text escaped.
    page = sre.get("/").text
    assert '<span id="run-state" class="badge rs-awaiting-confirmation">' in page
    assert re.findall(r'<li class="(ws-\w+(?: current)?)"', page) == ["ws-passed current",
                                                                       "ws-pending"]  # fmt: skip
    assert len(re.findall(r'<tr class="pass">', page)) == len(GATES)
    assert f"<code>killswitch runbook advance {run_id}</code>" in page
    assert "&lt;i&gt;first&lt;/i&gt; &amp; half" in page and WAVE_1 not in page

    # Employees see no runs: refused by the API, absent from their overview.
    employee = session_for(drill.server, "employee-1")
    for path in ("/api/runs", f"/api/runs/{run_id}"):
        reply = employee.get(path)
        assert reply.status == 403, path
        assert "incident commanders" in reply.json()["error"]
        assert Http(drill.server.http_port).get(path).status == 401, path
    assert "runbook" not in employee.json("/api/summary")["summary"]
    assert 'id="runbook"' not in employee.get("/").text and run_id not in employee.get("/").text

    drill.cli.ok("runbook", "advance", run_id)
    done = wait_state(sre, run_id, "completed")
    assert [w["state"] for w in done["waves"]] == ["passed", "passed"]
    assert done["current_wave"] == 1 and done["ended_at"] and done["next_step"] == ""
    assert done == cli_status(drill.cli, run_id)

    # A second run is listed first; the overview follows the newest.
    drill.runbook.write_text(PAUSE_DRILL)
    second = drill.cli.ok("runbook", "start", str(drill.runbook), "-q").strip()
    waiting = wait_state(sre, second, "awaiting-approval")
    assert waiting["current_wave"] == -1 and "--for-runbook" in waiting["next_step"]
    runs = sre.json("/api/runs")["runs"]
    assert [r["id"] for r in runs] == [second, run_id]
    assert runs == drill.cli.json("runbook", "list")[::-1]
    assert sre.json("/api/summary")["summary"]["runbook"] == waiting
    page = sre.get("/").text
    assert "rs-awaiting-approval" in page and 'id="run-gates"' not in page


def test_the_overview_shows_the_run_and_follows_it_live_in_chromium(drill: Drill) -> None:
    sync_api = require_browser()
    base = f"http://127.0.0.1:{drill.server.http_port}"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_context(viewport={"width": 1440, "height": 1000}).new_page()
            problems = collect_problems(page)
            sign_in(page, drill.cli, base)
            page.wait_for_selector("#live-status.on", timeout=10_000)
            assert page.text_content("#run-empty") == "No runbook has run yet."
            page.evaluate("window.__loadedOnce = true")

            # The run appears without a reload, and stops at the wave that needs a person.
            run_id = drill.start()
            page.wait_for_function(
                "() => document.getElementById('run-state')?.textContent"
                " === 'awaiting-confirmation'",
                timeout=30_000,
            )
            assert page.text_content("#run-name") == "dashboard-drill"
            assert wave_cells(page) == [["passed", True], ["pending", False]]
            assert page.text_content("#run-waves li b") == f"1. {WAVE_1}"  # as text, not markup
            results = page.eval_on_selector_all(
                "#run-gates tbody tr", "rows => rows.map(r => r.cells[1].textContent)"
            )
            assert results == ["pass"] * len(GATES)
            assert (
                page.text_content("#run-next") == f"Next step: killswitch runbook advance {run_id}"
            )
            waiting = background(page, "#run-state")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard-runbook.png"), full_page=True)

            # Confirmed: wave 2 runs, then the run completes, all on the same page.
            drill.cli.ok("runbook", "advance", run_id)
            page.wait_for_function(
                "() => document.getElementById('run-state').textContent === 'completed'",
                timeout=30_000,
            )
            assert wave_cells(page) == [["passed", False], ["passed", True]]
            assert page.query_selector("#run-next") is None
            assert background(page, "#run-state") == "rgb(26, 127, 55)" != waiting
            assert page.evaluate("window.__loadedOnce") is True, "the page was reloaded"
            assert problems == [], problems  # no script errors, no CSP violations
        finally:
            browser.close()


def wave_cells(page: Any) -> list[list[Any]]:
    cells: list[list[Any]] = page.eval_on_selector_all(
        "#run-waves li",
        "cells => cells.map(c => [c.dataset.state, c.classList.contains('current')])",
    )
    return cells


def background(page: Any, selector: str) -> str:
    return str(page.eval_on_selector(selector, "el => getComputedStyle(el).backgroundColor"))
