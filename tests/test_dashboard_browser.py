"""The dashboard in a real headless Chromium, against a real server and a faulty fleet.

Needs Debian's ``/usr/bin/chromium`` (``apt-get install chromium``; the CI set-up
installs it). Without it the test is skipped, except under ``CI=true`` where a
missing browser is a failure, so CI can never pass by skipping it. The screenshot is
kept in ``test-artifacts/dashboard.png``.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from tests.conftest import Cli
from tests.conftest import Simulate
from tests.conftest import StartServer
from tests.conftest import missing_tool
from tests.conftest import person_role
from tests.conftest import wait_for

CHROMIUM = Path("/usr/bin/chromium")


def click_until_navigated(page: Any, selector: str, url: str, attempts: int = 3) -> None:
    """Click, and click again if a live redraw or a late navigation swallowed the click;
    once the page has left (the click went through), just wait for it to arrive."""
    for attempt in range(attempts):
        page.click(selector)
        try:
            page.wait_for_url(url, timeout=5_000)
            return
        except Exception as exc:  # playwright's TimeoutError; the module loads lazily
            if attempt == attempts - 1 or "Timeout" not in type(exc).__name__:
                raise
        try:
            still_there = page.query_selector(selector) is not None
        except Exception:  # the page is being replaced: the click went through
            still_there = False
        if not still_there:
            page.wait_for_url(url, timeout=30_000)
            return


def sign_in(page: Any, cli: Cli, base: str) -> None:
    """Open a login link as a person would: it asks first, and the button signs in
    (a POST with a CSRF token); then the overview."""
    page.goto(cli.ok("dashboard").strip())
    assert page.text_content("#login-as") == f"Sign in as {cli.identity}, role {role_of(cli)}?"
    # One click: the page has no script to swallow it, and a second would post a used form.
    with page.expect_navigation(url=f"{base}/", wait_until="domcontentloaded"):
        page.click("#login-confirm")


def role_of(cli: Cli) -> str:
    return person_role(cli.identity)


def collect_problems(page: Any) -> list[str]:
    """Script errors and console errors (CSP violations among them) the page reports."""
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on(
        "console",
        lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None,
    )
    return problems


ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
AGENTS = 30


def require_browser() -> Any:
    """The Playwright sync API, or skip (fail under CI) with the reason."""
    missing = ""
    if not CHROMIUM.exists():
        missing = f"{CHROMIUM} is missing (apt-get install -y --no-install-recommends chromium)"
    try:
        from playwright import sync_api
    except ImportError:
        missing = missing or "the playwright package is missing (pip install -e '.[dev]')"
    if missing:
        missing_tool(f"the browser test cannot run: {missing}")
    return sync_api


def rows_shown(page: Any) -> list[str]:
    return list(
        page.eval_on_selector_all(
            "#agents-table tbody tr", "rows => rows.map(r => r.dataset.agentId)"
        )
    )


def test_dashboard_in_headless_chromium(
    start_server: StartServer, simulate: Simulate, tmp_path: Path
) -> None:
    sync_api = require_browser()
    server = start_server("--ack-deadline", "3")
    cli = Cli(server)
    truth_path = tmp_path / "truth.json"
    sim = simulate(server, AGENTS, "--fault", "ignore=0.2", "--fault-after", "3600",
                   "--truth", str(truth_path), "--seed", "5")  # fmt: skip
    wait_for(
        lambda: cli.json("status")["agents"]["by_state"].get("CAPTURING") == AGENTS,
        60,
        "the fleet capturing",
    )
    sim.proc.send_signal(signal.SIGUSR1)  # the faults strike
    wait_for(
        lambda: truth_path.exists() and json.loads(truth_path.read_text())["trigger_at"],
        10,
        "the faults to strike",
    )
    truth = json.loads(truth_path.read_text())["agents"]
    ignoring = {row["agent_id"] for row in truth if row["fault"] == "ignore"}
    assert len(ignoring) == AGENTS // 5
    cli.pause("--all", "--reason", "browser drill", "--ticket", "INC-42")

    def played_out() -> bool:
        by_state: dict[str, int] = cli.json("status")["agents"]["by_state"]
        return by_state == {"OVERDUE": len(ignoring), "VERIFIED_STOPPED": AGENTS - len(ignoring)}

    wait_for(played_out, 30, "stragglers OVERDUE, everyone else verified stopped")
    overdue = set(cli.agents("--state", "OVERDUE"))
    assert overdue == ignoring
    base = f"http://127.0.0.1:{server.http_port}"

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            context = browser.new_context(viewport={"width": 1440, "height": 1100})
            page = context.new_page()
            problems = collect_problems(page)
            sign_in(page, cli, base)
            page.wait_for_selector("#live-status.on", timeout=10_000)
            assert page.text_content("#count-OVERDUE") == str(len(overdue))
            assert page.text_content("#compliant") == "NO"
            assert "INC-42" in (page.text_content("#holds") or "")
            page.evaluate("window.__loadedOnce = true")

            # Filter to OVERDUE: exactly the agents the CLI reports, and nothing else.
            page.select_option("#filter-state", "OVERDUE")
            page.wait_for_function(
                """n => {
                  const rows = [...document.querySelectorAll('#agents-table tbody tr')];
                  return rows.length === n
                    && rows.every(r => r.querySelector('.badge').textContent === 'OVERDUE');
                }""",
                arg=len(overdue),
                timeout=10_000,
            )
            assert set(rows_shown(page)) == overdue
            assert "state=OVERDUE" in page.url
            assert page.text_content("#table-info") == f"{len(overdue)} matching"

            # A live update arrives without a reload: a second pause moves the epoch.
            epoch = int(page.text_content("#epoch") or "0")
            straggler = sorted(overdue)[0]
            cli.pause("--agent", straggler, "--reason", "second hold")
            page.wait_for_function(
                "e => document.getElementById('epoch').textContent === e",
                arg=str(epoch + 1),
                timeout=10_000,
            )
            page.wait_for_function(
                "() => document.querySelectorAll('#holds-table tbody tr').length === 2",
                timeout=10_000,
            )
            assert page.evaluate("window.__loadedOnce") is True, "the page was reloaded"
            # The straggler's new directive restarts its deadline (PENDING, then OVERDUE
            # again): the page follows the CLI's answer, not at the same instant.
            wait_for(
                lambda: set(rows_shown(page)) == set(cli.agents("--state", "OVERDUE")),
                15,
                "the page's OVERDUE rows to match the CLI's",
            )

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # The laptop page: what it was sent, and that it never answered.
            page.click(f'#agents-table tbody tr[data-agent-id="{straggler}"] a')
            page.wait_for_url(f"{base}/agents/{straggler}")
            assert page.text_content("#agent-state") == "OVERDUE"
            timeline = page.text_content("#timeline") or ""
            assert "sent PAUSED" in timeline and "hold_created" in timeline
            assert "STOP_REPORTED" not in timeline
            page.screenshot(path=str(ARTIFACTS / "dashboard-laptop.png"), full_page=True)
            assert problems == [], problems  # no script errors, no CSP violations

            # An employee sees their own laptop and nothing else.
            employee = browser.new_context().new_page()
            sign_in(employee, cli.as_("employee-1"), base)
            owned = set(cli.agents("--selector", "owner=employee-1"))
            assert owned == {"laptop-00000"}
            assert set(rows_shown(employee)) == owned
            assert employee.text_content("#total") == "1"
            employee.goto(f"{base}/agents/laptop-00001")
            assert "No such laptop" in (employee.text_content("h1") or "")

            # Typing a prefix and clicking column headers re-read the page in place.
            page.goto(f"{base}/")
            page.wait_for_selector("#live-status.on", timeout=10_000)
            page.fill("#filter-prefix", "laptop-0000")
            page.wait_for_function(
                "() => document.getElementById('table-info').textContent === '10 matching'",
                timeout=10_000,
            )
            page.click('#agents-table th[data-sort="agent_id"] a')
            page.wait_for_function(
                "() => document.querySelector('#agents-table tbody tr').dataset.agentId"
                " === 'laptop-00000'",
                timeout=10_000,
            )
            page.click('#agents-table th[data-sort="agent_id"] a')
            page.wait_for_function(
                "() => document.querySelector('#agents-table tbody tr').dataset.agentId"
                " === 'laptop-00009'",
                timeout=10_000,
            )
            assert rows_shown(page) == [f"laptop-0000{i}" for i in range(9, -1, -1)]
            assert "prefix=laptop-0000" in page.url and "order=desc" in page.url
            assert problems == [], problems
            # Logging out ends the session.
            click_until_navigated(page, "form.logout button", f"{base}/logout")
            page.goto(f"{base}/")
            assert "Log in to the dashboard" in (page.text_content("h1") or "")
        finally:
            browser.close()
