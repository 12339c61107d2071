"""The web dashboard over HTTP, against a real server: access, roles, filters, exports.

The tests drive `killswitch serve` and `killswitch-agent simulate` subprocesses and log in
with a link from `killswitch dashboard`, exactly as a person would, over one settled fleet
the dashboard and the CLI can be compared on field for field. Timelines and live updates:
test_dashboard_timeline.py; what only runs in-process (a link expiring after two minutes):
test_dashboard_security.py.
"""

from __future__ import annotations

import csv
import io
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import pytest

from control.domain import ComplianceState
from control.plane import SEVERITY
from control.web import api
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulator
from tests.conftest import module_server
from tests.conftest import terminate
from tests.conftest import wait_for
from tests.dashboard_support import Http
from tests.dashboard_support import assert_hardened
from tests.dashboard_support import session_for

EVIL = '<script>alert("pwned")</script> & leak'
EVIL_TICKET = "<b>INC-7</b>"
AGENTS = 40
PAGES = ["/", "/agents/laptop-00000"]
APIS = [
    "/api/summary",
    "/api/agents",
    "/api/agents/laptop-00000",
    "/api/events",
    "/export/agents.csv",
    "/export/agents.json",
]


# ------------------------------------------------------------------ a settled fleet


@dataclass
class Fleet:
    server: ServerProcess
    cli: Cli
    paused_region: str
    never_seen: list[str]


# Its module-scoped server is built once: the module runs on one worker (Makefile).
pytestmark = pytest.mark.xdist_group("dashboard")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """40 agents that connected, a region paused with an evil reason, then every agent gone,
    and 5 expected laptops never seen: states that no longer move, so the dashboard and the
    CLI can be compared field for field."""
    with module_server(tmp_path_factory, "dash") as server:
        sim: Simulator | None = None
        try:
            cli = Cli(server)
            sim = Simulator(server, AGENTS, ["--fault-after", "3600", "--seed", "3"])
            wait_for(
                lambda: cli.json("status")["agents"]["by_state"].get("CAPTURING") == AGENTS,
                60,
                "the fleet capturing",
            )
            regions = sorted({a["labels"]["region"] for a in cli.agents().values()})
            region = regions[0]
            cli.pause("--selector", f"region={region}", "--reason", EVIL, "--ticket", EVIL_TICKET)
            paused = cli.agents("--selector", f"region={region}")
            wait_for(
                lambda: (
                    {a["state"] for a in cli.agents("--selector", f"region={region}").values()}
                    == {"VERIFIED_STOPPED"}
                ),
                30,
                "the region verified stopped",
            )
            terminate(sim.proc)
            inventory = server.data_dir.parent / "inventory.csv"
            never = [f"spare-{i}" for i in range(5)]
            inventory.write_text(
                "agent_id,region,owner\n" + "".join(f"{a},{region},nobody\n" for a in never)
            )
            cli.ok("inventory", "import", str(inventory))

            def settled() -> bool:
                states = {a["state"] for a in cli.agents().values()}
                return states <= {"OFFLINE", "OFFLINE_LEASE_EXPIRED", "NEVER_SEEN"}

            wait_for(settled, 30, "every agent offline, leases expired")
            assert len(paused) >= 2
            yield Fleet(server, cli, region, never)
        finally:
            if sim is not None:
                sim.stop()


def test_every_page_and_api_needs_a_session(fleet: Fleet) -> None:
    anonymous = Http(fleet.server.http_port)
    forged = Http(fleet.server.http_port, cookie="not-a-session")
    for browser in (anonymous, forged):
        for path in PAGES:
            reply = browser.get(path)
            assert reply.status == 401, path
            assert "killswitch dashboard" in reply.text
            assert_hardened(reply)
        for path in APIS:
            reply = browser.get(path)
            assert reply.status == 401, path
            assert "killswitch dashboard" in reply.json()["error"]
    assert anonymous.get("/static/dashboard.css").status == 200  # public, no data


def test_a_login_link_works_once_and_sets_a_strict_http_only_cookie(fleet: Fleet) -> None:
    browser = Http(fleet.server.http_port)
    url = fleet.cli.as_("sre-1").ok("dashboard").strip()
    page, form = browser.open_link(url)
    assert page.status == 200 and "Sign in as <strong>sre-1, role sre</strong>" in page.text
    assert_hardened(page)
    first = browser.confirm(form)
    assert first.status == 303 and first.headers["Location"] == "/"
    cookie = first.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain http, and no https --public-url
    assert_hardened(first)
    again, _ = browser.open_link(url)
    assert again.status == 401 and "already used" in again.text
    assert browser.confirm(form).status == 403  # nor can the form be posted twice
    home = browser.get("/")
    assert home.status == 200 and "sre-1" in home.text
    assert_hardened(home)
    assert home.headers["Cache-Control"] == "no-store"
    # Logging out ends the session server-side, not just in the browser.
    assert browser.get("/logout", method="POST").status == 200
    assert browser.get("/").status == 401
    assert browser.get("/api/agents").status == 401


def test_roles_operators_see_all_employees_their_own_automation_nothing(fleet: Fleet) -> None:
    for identity in ("ic-1", "approver-1", "sre-1"):
        assert session_for(fleet.server, identity).json("/api/summary")["summary"]["total"] == (
            AGENTS + len(fleet.never_seen)
        )
    refused = fleet.cli.as_("automation-1").run("dashboard")
    assert refused.returncode == 1 and "permission denied" in refused.stderr

    employee = session_for(fleet.server, "employee-1")
    assert [r["agent_id"] for r in employee.all_rows()] == ["laptop-00000"]
    summary = employee.json("/api/summary")["summary"]
    assert summary["total"] == 1 and sum(summary["by_state"].values()) == 1
    # Only the holds covering their laptop, and not who made them.
    assert all(set(h) <= {"id", "kind", "reason", "created_at", "created_at_s", "created_epoch"}
               for h in summary["holds"])  # fmt: skip
    # A selector cannot reach someone else's laptops.
    assert employee.all_rows(selector="owner=employee-2") == []
    assert employee.all_rows(selector=f"region={fleet.paused_region}") == [
        r for r in employee.all_rows() if r["labels"]["region"] == fleet.paused_region
    ]
    exported = employee.get("/export/agents.json").json()
    assert [r["agent_id"] for r in exported] == ["laptop-00000"]
    assert employee.json("/api/agents/laptop-00000")["agent"]["agent_id"] == "laptop-00000"
    # Someone else's laptop looks exactly like one that does not exist.
    other, missing = employee.get("/agents/laptop-00001"), employee.get("/agents/no-such-laptop")
    assert other.status == missing.status == 404
    assert other.text == missing.text
    assert (
        employee.get("/api/agents/laptop-00001").body
        == employee.get("/api/agents/no-such-laptop").body
    )
    page = employee.get("/").text
    assert "laptop-00001" not in page and "owner=employee-1" in page


def test_filters_sorting_and_pages_match_the_cli(fleet: Fleet) -> None:
    browser = session_for(fleet.server, "ic-1")
    cli = fleet.cli
    region = fleet.paused_region
    cases: list[tuple[dict[str, str], list[str]]] = [
        ({}, []),
        ({"state": "OFFLINE_LEASE_EXPIRED"}, ["--state", "OFFLINE_LEASE_EXPIRED"]),
        ({"state": "never_seen"}, ["--state", "NEVER_SEEN"]),
        ({"selector": f"region={region}"}, ["--selector", f"region={region}"]),
        ({"selector": f"region={region},owner=nobody"},
         ["--selector", f"region={region},owner=nobody"]),
        ({"state": "OFFLINE", "selector": "os=linux"},
         ["--state", "OFFLINE", "--selector", "os=linux"]),
    ]  # fmt: skip
    for params, args in cases:
        expected = cli.json("agents", *args)
        assert expected or "os" in params.get("selector", ""), params
        assert browser.all_rows(**params) == expected, params
        # Exports: every matching row, not a page, in the same order and shape.
        query = urlencode(params)
        assert browser.get(f"/export/agents.json?{query}").json() == expected, params
        assert csv_rows(browser.get(f"/export/agents.csv?{query}").text) == [
            csv_expected(r) for r in expected
        ], params
    # Id prefix (the CLI has none: filter its output).
    everyone = cli.json("agents")
    assert browser.all_rows(prefix="laptop-0001") == [
        r for r in everyone if r["agent_id"].startswith("laptop-0001")
    ]
    assert browser.all_rows(prefix="zzz") == []
    # Non-compliant first by default: the CLI's order, the plane's SEVERITY.
    ranks = [SEVERITY.index(ComplianceState(r["state"])) for r in browser.all_rows()]
    assert ranks == sorted(ranks)
    # Any column, either way; ties by id; empty values last.
    for column in api.SORT_KEYS:
        for order in ("asc", "desc"):
            rows = browser.all_rows(per_page=13, sort=column, order=order)
            assert sorted(r["agent_id"] for r in rows) == sorted(r["agent_id"] for r in everyone)
            assert_sorted(rows, column, descending=order == "desc")
    # A page past the end shows the last page; page sizes are capped.
    last = browser.json("/api/agents", page=999, per_page=10)
    assert last["page"] == last["pages"] == 5 and len(last["rows"]) == 5
    assert browser.json("/api/agents", per_page=100000)["per_page"] == api.PER_PAGE_MAX
    # Bad input: 400 and one line saying why.
    for params in ({"state": "NAPPING"}, {"selector": "no-equals"}, {"sort": "password"},
                   {"order": "sideways"}, {"page": "x"}, {"hold": "hold-unknown"}):  # fmt: skip
        reply = browser.get(f"/api/agents?{urlencode(params)}")
        assert reply.status == 400, params
        assert "\n" not in reply.json()["error"]
        assert browser.get(f"/?{urlencode(params)}").status == 400
    # The page without JavaScript: the same rows, as HTML.
    html = browser.get("/?" + urlencode({"state": "NEVER_SEEN"})).text
    assert re.findall(r'<tr data-agent-id="([^"]+)"', html) == fleet.never_seen


def sort_value(row: dict[str, Any], column: str) -> Any:
    if column == "state":
        return SEVERITY.index(ComplianceState(row["state"]))
    if column == "labels":
        return ",".join(f"{k}={v}" for k, v in sorted(row["labels"].items()))
    return row[column]


TIMESTAMPS = {"since", "last_seen", "lease_expires_at", "verified_at"}


def assert_sorted(rows: list[dict[str, Any]], column: str, *, descending: bool) -> None:
    values = [sort_value(r, column) for r in rows]
    present = [(v, r["agent_id"]) for v, r in zip(values, rows, strict=True) if v is not None]
    assert values == [v for v, _ in present] + [None] * (len(values) - len(present)), column
    for (a, a_id), (b, b_id) in itertools.pairwise(present):
        if a != b:
            assert (a > b) if descending else (a < b), (column, a, b)
        elif column not in TIMESTAMPS:  # shown to the ms, sorted on the exact time
            assert a_id < b_id, (column, "ties by id", a_id, b_id)


def csv_rows(text: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames == list(api.CSV_COLUMNS)
    return list(reader)


def csv_expected(row: dict[str, Any]) -> dict[str, str]:
    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    out = {k: cell(row[k]) for k in api.CSV_COLUMNS}
    out["labels"] = ",".join(f"{k}={v}" for k, v in sorted(row["labels"].items()))
    out["hold_ids"] = " ".join(row["hold_ids"])
    return out


def test_user_input_is_escaped_everywhere(fleet: Fleet) -> None:
    browser = session_for(fleet.server, "ic-1")
    paused = fleet.cli.json("agents", "--selector", f"region={fleet.paused_region}")[0]
    pages = [browser.get("/").text, browser.get(f"/agents/{paused['agent_id']}").text]
    for page in pages:
        assert "<script>alert" not in page and "<b>INC-7</b>" not in page
        assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt; &amp; leak" in page
        # The only scripts are the dashboard's own files.
        common, own = re.findall(r"<script[^>]*>", page)
        assert common == '<script src="/static/common.js" defer>'
        assert re.fullmatch(r'<script src="/static/\w+\.js" defer>', own)
    assert "&lt;b&gt;INC-7&lt;/b&gt;" in pages[0]
    # JSON carries the text as it is (the page scripts only ever set textContent).
    holds = browser.json("/api/summary")["summary"]["holds"]
    assert [(h["reason"], h["ticket"]) for h in holds] == [(EVIL, EVIL_TICKET)]


def test_a_csv_cell_cannot_become_a_spreadsheet_formula() -> None:
    row = {c: "" for c in api.CSV_COLUMNS} | {"labels": {}, "hold_ids": [], "reason": "=cmd()"}
    assert api.csv_cells(row)[api.CSV_COLUMNS.index("reason")] == "'=cmd()"
