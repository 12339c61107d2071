"""The web dashboard over HTTP, against a real server: access, filters, exports, timelines.

Most tests drive `killswitch serve` and `killswitch-agent simulate` subprocesses and log in
with a link from `killswitch dashboard`, exactly as a person would. What a real server
cannot show in test time (a login link expiring after two minutes, a session for an
identity that may not ask for one) runs in-process against the same handlers.
"""

from __future__ import annotations

import asyncio
import csv
import http.client
import io
import itertools
import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from control.domain import ComplianceState, Mode
from control.domain.identity import Principal, Role
from control.plane import SEVERITY, ControlPlane
from control.store.sqlite import SqliteStore
from control.web import api
from control.web.dashboard import Dashboard
from control.web.login import LOGIN_COOKIE, SESSION_COOKIE
from control.web.sessions import LOGIN_TOKEN_SECONDS, DashboardSessions
from control.web.timeline import MAX_EVENTS_PER_AGENT, MAX_EVENTS_TOTAL, Timeline
from tests.conftest import Cli, ServerProcess, Simulator, terminate, wait_for

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


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Http:
    """A browser without JavaScript: its session cookie (and, while signing in, its
    pre-session cookie), no redirects followed."""

    port: int
    cookie: str = ""
    login_cookie: str = ""
    history: list[str] = field(default_factory=list)

    def get(
        self, path: str, *, method: str = "GET", form: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> Reply:  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        cookies = [f"{SESSION_COOKIE}={self.cookie}"] if self.cookie else []
        if self.login_cookie:
            cookies.append(f"{LOGIN_COOKIE}={self.login_cookie}")
        headers = {"Cookie": "; ".join(cookies)} if cookies else {}
        body = None
        if form is not None:
            method, body = "POST", urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            conn.close()

    def json(self, path: str, **params: str | int) -> Any:
        query = f"?{urlencode(params)}" if params else ""
        reply = self.get(path + query)
        assert reply.status == 200, (path, params, reply.status, reply.text)
        return reply.json()

    def open_link(self, url: str) -> tuple[Reply, dict[str, str]]:
        """Open a login link: its confirmation page, and the form on it (token, csrf)."""
        parts = urlsplit(url)
        assert parts.port == self.port, url
        reply = self.get(f"{parts.path}?{parts.query}")
        form = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', reply.text))
        if set_cookie := reply.headers.get("Set-Cookie"):
            self.login_cookie = cookie_value(set_cookie, LOGIN_COOKIE)
        return reply, form

    def confirm(self, form: dict[str, str]) -> Reply:
        """Post the confirmation form; keep the session cookie it sets."""
        reply = self.get("/login", form=form)
        if reply.status == 303:
            set_cookies = "\n".join(reply.headers.get_all("Set-Cookie") or [])
            self.cookie = cookie_value(set_cookies, SESSION_COOKIE)
        return reply

    def login(self, cli: Cli) -> Http:
        page, form = self.open_link(cli.ok("dashboard").strip())
        assert page.status == 200 and set(form) == {"token", "csrf"}, page
        reply = self.confirm(form)
        assert reply.status == 303 and reply.headers["Location"] == "/", reply
        return self

    def all_rows(self, per_page: int | str = 7, **params: str | int) -> list[dict[str, Any]]:
        """Every page of /api/agents, concatenated."""
        rows: list[dict[str, Any]] = []
        page = 1
        while True:
            data = self.json("/api/agents", page=page, per_page=per_page, **params)
            rows.extend(data["rows"])
            assert data["page"] == page and data["total"] >= len(rows)
            if page >= data["pages"]:
                assert len(rows) == data["total"]
                return rows
            page += 1


def cookie_value(set_cookie: str, name: str) -> str:
    match = re.search(rf"{name}=([^;]+);", set_cookie)
    assert match, set_cookie
    return match.group(1)


def session_for(server: ServerProcess, identity: str) -> Http:
    return Http(server.http_port).login(Cli(server, identity))


def assert_hardened(reply: Reply) -> None:
    csp = reply.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert reply.headers["X-Content-Type-Options"] == "nosniff"


# ------------------------------------------------------------------ a settled fleet


@dataclass
class Fleet:
    server: ServerProcess
    cli: Cli
    paused_region: str
    never_seen: list[str]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """40 agents that connected, a region paused with an evil reason, then every agent gone,
    and 5 expected laptops never seen: states that no longer move, so the dashboard and the
    CLI can be compared field for field."""
    server = ServerProcess(tmp_path_factory.mktemp("dash") / "data", [])
    server.start()
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
        server.stop()


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


# ------------------------------------------------------------------ a live fleet


def test_timeline_and_live_updates_after_a_pause(
    start_server: Callable[..., ServerProcess], simulate: Callable[..., Simulator]
) -> None:
    server = start_server()
    cli = Cli(server)
    simulate(server, 6, "--fault-after", "3600")
    wait_for(
        lambda: cli.json("status")["agents"]["by_state"].get("CAPTURING") == 6, 60, "capturing"
    )
    browser = session_for(server, "ic-1")
    with EventStream(server.http_port, browser.cookie) as events:
        first = events.next_message()
        assert first["summary"]["epoch"] == 0 and first["summary"]["pause"] is None
        hold = cli.pause("--all", "--reason", "drill", "--ticket", "INC-9")
        # Pushed within a tick or two, without asking: the new epoch, and "a hold changed".
        message = events.until(lambda m: m["summary"]["epoch"] == 1, timeout=5)
        assert message["summary"]["pause"]["hold_id"] == hold
        assert message["changed"] is None or "" in message["changed"]
        wait_for(
            lambda: cli.json("status")["agents"]["by_state"] == {"VERIFIED_STOPPED": 6},
            30,
            "the fleet verified stopped",
        )
        settled = events.until(lambda m: m["summary"]["compliant"], timeout=5)
        ttc = settled["summary"]["time_to_compliance"]
        assert (ttc["paused"], ttc["verified"], ttc["waiting"]) == (6, 6, 0)
        assert ttc["p50"]["verified"] and ttc["p50"]["seconds"] <= ttc["p99"]["seconds"]
        assert ttc["slowest"]["agent_id"].startswith("laptop-")

    data = browser.json("/api/agents/laptop-00000")
    assert data["agent"]["state"] == "VERIFIED_STOPPED" and data["agent"]["violation"] is None
    timeline = list(reversed(data["timeline"]))  # oldest first
    kinds = [e["kind"] for e in timeline]
    assert kinds[0] == "connected"
    after_hold = kinds[kinds.index("hold_created") :]
    assert "directive" in after_hold and "ack" in after_hold and "verified" in after_hold
    assert after_hold.index("directive") < after_hold.index("ack") < after_hold.index("verified")
    states = [e["state"] for e in timeline[kinds.index("hold_created") :] if e["state"]]
    assert states == ["PENDING", "STOP_REPORTED", "VERIFIED_STOPPED"]
    hold_event = timeline[kinds.index("hold_created")]
    assert hold in hold_event["text"] and "ic-1" in hold_event["text"]
    # Heartbeats are one entry per run, with a count.
    beats = [e for e in timeline if e["kind"] == "heartbeat"]
    assert beats and all(e["count"] >= 1 for e in beats)
    assert len(beats) <= kinds.count("ack") + kinds.count("verified") + 2
    page = browser.get("/agents/laptop-00000").text
    for text in ("sent PAUSED", "STOP_REPORTED", "stop verified", hold):
        assert text in page
    assert browser.get("/agents/no-such-laptop").status == 404


class EventStream:
    """A raw Server-Sent Events reader over a socket (no client library needed)."""

    def __init__(self, port: int, cookie: str) -> None:
        self.port = port
        self.cookie = cookie
        self.sock: socket.socket | None = None
        self.buffer = b""

    def open(self) -> int:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.sock.sendall(
            b"GET /api/events HTTP/1.1\r\nHost: dashboard\r\n"
            + f"Cookie: {SESSION_COOKIE}={self.cookie}\r\n\r\n".encode()
        )
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        return int(head.split()[1])

    def _read(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        assert chunk, "stream closed"
        self.buffer += chunk

    def next_message(self) -> dict[str, Any]:
        while True:
            # Chunked transfer encoding: find "data: {...}\n\n" inside the chunks.
            match = re.search(rb"data: (\{.*?\})\n\n", self.buffer, re.S)
            if match:
                self.buffer = self.buffer[match.end() :]
                return dict(json.loads(match.group(1)))
            self._read()

    def until(self, predicate: Callable[[dict[str, Any]], Any], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.next_message()
            if predicate(message):
                return message
        raise AssertionError(f"no matching message within {timeout}s")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()

    def __enter__(self) -> EventStream:
        assert self.open() == 200
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------ in process


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def in_process(tmp_path: Path, scenario: Callable[..., Any]) -> None:
    """The dashboard's handlers on a real aiohttp server and plane, with a clock we move."""

    async def run() -> None:
        clock = FakeClock()
        store = await SqliteStore.open(tmp_path)
        plane = ControlPlane(store, clock=clock, flush_interval=3600)
        await plane.start()
        sessions = DashboardSessions(store, clock)
        dashboard = Dashboard(plane, sessions)
        app = web.Application()
        app.add_routes(dashboard.routes())
        client = TestClient(TestServer(app))
        await client.start_server()
        try:
            await scenario(client, sessions, clock, plane)
        finally:
            await dashboard.close()
            await client.close()
            await plane.stop()
            await store.close()

    asyncio.run(run())


def test_login_links_expire_and_only_people_get_in(tmp_path: Path) -> None:
    async def scenario(
        client: TestClient[Any, Any], sessions: DashboardSessions, clock: FakeClock, plane: Any
    ) -> None:
        sre = Principal("sre-1", Role.SRE, serial="01")
        token, _ = await sessions.issue_login(sre)
        clock.now += LOGIN_TOKEN_SECONDS + 1
        late = await client.get(f"/login?token={token}", allow_redirects=False)
        assert late.status == 401
        token, _ = await sessions.issue_login(sre)
        clock.now += LOGIN_TOKEN_SECONDS - 1
        page = await client.get(f"/login?token={token}", allow_redirects=False)
        assert page.status == 200
        form = dict(re.findall(r'name="(\w+)" value="([^"]*)"', await page.text()))
        clock.now += 0.5
        ok = await client.post("/login", data=form, allow_redirects=False)
        assert ok.status == 303
        client.session.cookie_jar.clear()  # from here on, only the cookies given
        for role in (Role.AUTOMATION, Role.AGENT):
            token, _ = await sessions.issue_login(Principal("robot", role, serial="02"))
            refused = await client.get(f"/login?token={token}", allow_redirects=False)
            assert refused.status == 403 and SESSION_COOKIE not in refused.cookies
            # Even a session made some other way gets nowhere.
            redeemed = await sessions.redeem(
                (await sessions.issue_login(Principal("robot", role)))[0]
            )
            assert redeemed is not None
            cookie = {"Cookie": f"{SESSION_COOKIE}={redeemed[0]}"}
            for path in ("/", "/api/agents", "/api/events", "/export/agents.csv"):
                assert (await client.get(path, headers=cookie)).status == 403, path
        # An employee with no laptop sees an empty fleet, not an error.
        employee = await sessions.redeem(
            (await sessions.issue_login(Principal("employee-9", Role.EMPLOYEE)))[0]
        )
        assert employee is not None
        cookie = {"Cookie": f"{SESSION_COOKIE}={employee[0]}"}
        data = await (await client.get("/api/summary", headers=cookie)).json()
        assert data["summary"]["total"] == 0

    in_process(tmp_path, scenario)


# ------------------------------------------------------------------ timeline bounds


def test_the_timeline_stays_bounded_and_coalesces_heartbeats() -> None:
    timeline = Timeline()
    for i in range(3 * MAX_EVENTS_PER_AGENT):
        timeline.directive_sent("a", epoch=i, mode=Mode.PAUSED, at=float(i))
        timeline.heartbeat("a", at=i + 0.5)
        timeline.heartbeat("a", at=i + 0.7)
    rings = dict(timeline.iter_rings())
    assert rings["a"] == MAX_EVENTS_PER_AGENT
    events = timeline.events("a", {})
    assert events[-1].count == 2 and events[-1].last_at == 3 * MAX_EVENTS_PER_AGENT - 0.3  # type: ignore[union-attr]
    # A big fleet: the total stays within budget, every agent keeps its newest entries.
    fleet = 2 * MAX_EVENTS_TOTAL // MAX_EVENTS_PER_AGENT
    for round_ in range(MAX_EVENTS_PER_AGENT // 4):
        for n in range(fleet):
            timeline.directive_sent(f"agent-{n}", epoch=round_, mode=Mode.PAUSED, at=1e6 + round_)
    assert timeline.total_events <= MAX_EVENTS_TOTAL
    assert sum(n for _, n in timeline.iter_rings()) == timeline.total_events
    newest = timeline.events("agent-7", {})[-1]
    assert newest.epoch == MAX_EVENTS_PER_AGENT // 4 - 1


def test_changes_since_names_agents_and_gives_up_when_too_far_behind() -> None:
    timeline = Timeline()
    start = timeline.version
    timeline.acked("a", epoch=1, mode=Mode.PAUSED, latency=0.1, at=1.0)
    timeline.heartbeat("b", at=1.0)  # liveness alone is not a change
    timeline.nacked("c", epoch=1, reason="stuck", at=1.0)
    changes = timeline.changes_since(start)
    assert changes.agent_ids == frozenset({"a", "c"}) and changes.version == start + 2
    assert timeline.changes_since(changes.version).agent_ids == frozenset()
    for i in range(5000):
        timeline.connected(f"x{i}", reconnect=False, at=2.0)
    assert timeline.changes_since(start).agent_ids is None
