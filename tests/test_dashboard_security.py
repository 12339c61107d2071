"""The dashboard's session hardening, against a real server and a plain HTTP client.

Secure cookies behind an https public URL, login links that need a confirmation from
the browser that opened them (login CSRF), live-update slots shared out per session
and per person, and /metrics moved off the dashboard's port. In process, against the
same handlers with a clock the test moves: login links expiring, and identities that
are not people kept out.
"""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from aiohttp.test_utils import TestServer

from control.domain.identity import Principal
from control.domain.identity import Role
from control.plane import ControlPlane
from control.store.sqlite import SqliteStore
from control.web.dashboard import Dashboard
from control.web.login import SESSION_COOKIE
from control.web.sessions import LOGIN_TOKEN_SECONDS
from control.web.sessions import DashboardSessions
from control.web.streams import MAX_EVENT_STREAMS
from control.web.streams import MAX_STREAMS_PER_USER
from control.web.streams import OPERATOR_RESERVED_STREAMS
from control.web.streams import StreamSlots
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import free_port
from tests.dashboard_support import EventStream
from tests.dashboard_support import Http
from tests.dashboard_support import session_for
from tests.fake_clock import FakeClock


def test_an_https_public_url_makes_the_cookies_secure(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server("--public-url", "https://dash.example.test/")
    url = Cli(server, "sre-1").ok("dashboard").strip()
    assert url.startswith("https://dash.example.test/login?token=")
    # As the TLS proxy would forward it: plain http to the --http port.
    browser = Http(server.http_port)
    page, form = browser.open_link(url.replace("https://dash.example.test", browser_base(server)))
    login_cookie = page.headers["Set-Cookie"]
    assert "Secure" in login_cookie and "HttpOnly" in login_cookie
    assert "SameSite=Strict" in login_cookie and "Path=/login" in login_cookie
    signed_in = browser.confirm(form)
    assert signed_in.status == 303
    session_cookie = next(
        c for c in signed_in.headers.get_all("Set-Cookie") or [] if c.startswith(SESSION_COOKIE)
    )
    assert "Secure" in session_cookie and "HttpOnly" in session_cookie
    assert "SameSite=Strict" in session_cookie
    assert browser.get("/api/summary").status == 200
    # No --metrics-listen: /metrics stays on the --http port (the default).
    assert fetch(server.http_port, "/metrics")[0] == 200


def browser_base(server: ServerProcess) -> str:
    return f"http://127.0.0.1:{server.http_port}"


def test_opening_someone_elses_login_link_does_not_sign_you_in(server: ServerProcess) -> None:
    victim = session_for(server, "sre-1")
    attackers_link = Cli(server, "employee-1").ok("dashboard").strip()
    # The victim is made to open the link: a page asking, nothing more.
    page, victims_form = victim.open_link(attackers_link)
    assert page.status == 200
    assert "Sign in as <strong>employee-1, role employee</strong>?" in page.text
    assert "This browser is signed in as sre-1 (sre)" in page.text
    assert victim.get("/api/summary").json()["summary"]["employee_view"] is False
    # The attacker opens it too and posts their own form from the victim's browser
    # (a cross-site form): its CSRF token is bound to the attacker's pre-session.
    attacker = Http(server.http_port)
    _, attackers_form = attacker.open_link(attackers_link)
    assert victim.confirm(attackers_form).status == 403
    # Nor does the right token work without this browser's pre-session cookie.
    cookieless = Http(server.http_port, cookie=victim.cookie)
    assert cookieless.confirm(victims_form).status == 403
    assert victim.get("/api/summary").json()["summary"]["employee_view"] is False
    # Opening the page did not use the link up: its owner can still sign in, once.
    assert attacker.confirm(attackers_form).status == 303
    assert attacker.get("/api/summary").json()["summary"]["employee_view"] is True
    again = Http(server.http_port)
    replay, _ = again.open_link(attackers_link)
    assert replay.status == 401
    assert victim.confirm(victims_form).status == 403  # used up for everyone


def test_a_tampered_csrf_token_is_refused(server: ServerProcess) -> None:
    browser = Http(server.http_port)
    _, form = browser.open_link(Cli(server, "ic-1").ok("dashboard").strip())
    assert browser.login_cookie
    assert browser.confirm({**form, "csrf": form["csrf"][:-2] + "xx"}).status == 403
    assert browser.confirm(form).status == 303


def read_until_ended(stream: EventStream) -> bytes:
    """Everything until the response ends: its last chunk, or the connection closing."""
    assert stream.sock is not None
    stream.sock.settimeout(10)
    while not stream.buffer.endswith(b"\r\n0\r\n\r\n"):
        chunk = stream.sock.recv(65536)
        if not chunk:
            break
        stream.buffer += chunk
    return stream.buffer


def test_one_live_stream_per_session_and_a_few_per_person(server: ServerProcess) -> None:
    sre = session_for(server, "sre-1")
    first = EventStream(server.http_port, sre.cookie)
    second = EventStream(server.http_port, sre.cookie)
    try:
        assert first.open() == 200
        assert second.open() == 200
        # The newer stream replaced the older one, which was told and ended.
        assert b"event: replaced" in read_until_ended(first)
        assert second.next_message()["summary"]["total"] == 0
    finally:
        first.close()
        second.close()

    # One employee with many sessions gets a few streams, and the SRE still gets one.
    employee_sessions = [session_for(server, "employee-1") for _ in range(MAX_STREAMS_PER_USER + 2)]
    streams = [EventStream(server.http_port, s.cookie) for s in employee_sessions]
    mine = EventStream(server.http_port, sre.cookie)
    try:
        statuses = [s.open() for s in streams]
        assert statuses == [200] * MAX_STREAMS_PER_USER + [503, 503]
        assert mine.open() == 200
    finally:
        for s in [*streams, mine]:
            s.close()


def test_employees_together_leave_slots_for_the_people_running_the_incident() -> None:
    """The per-person cap alone would let eight employees take every slot."""
    slots = StreamSlots()
    employees = MAX_EVENT_STREAMS - OPERATOR_RESERVED_STREAMS
    for n in range(employees):
        assert slots.take(f"s{n}", Principal(f"employee-{n}", Role.EMPLOYEE)) is not None
    assert slots.take("late", Principal("employee-late", Role.EMPLOYEE)) is None
    for n in range(OPERATOR_RESERVED_STREAMS):
        assert slots.take(f"op{n}", Principal(f"sre-{n}", Role.SRE)) is not None
    assert slots.take("full", Principal("ic-1", Role.INCIDENT_COMMANDER)) is None
    # A session's new stream takes its old stream's slot even when all are taken.
    assert slots.take("op0", Principal("sre-0", Role.SRE)) is not None


def fetch(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_metrics_on_their_own_address_leave_the_dashboard_port(
    start_server: Callable[..., ServerProcess],
) -> None:
    metrics_port = free_port()
    server = start_server("--metrics-listen", f"127.0.0.1:{metrics_port}")
    status, text = fetch(metrics_port, "/metrics")
    assert status == 200 and "killswitch_" in text
    assert fetch(server.http_port, "/metrics")[0] == 404
    assert fetch(server.http_port, "/readyz")[0] == 200  # probes stay where they were


def test_a_bad_public_url_is_one_clear_line() -> None:
    from control.addresses import dashboard_public_url
    from control.errors import InvalidInput

    assert dashboard_public_url("https://dash.example.test:8443/") == (
        "https://dash.example.test:8443"
    )
    for bad in ("dash.example.test", "ftp://x", "https://x/prefix", "https://x:99999"):
        try:
            dashboard_public_url(bad)
        except InvalidInput as exc:
            assert "--public-url" in str(exc)
        else:
            raise AssertionError(f"accepted {bad!r}")


# ------------------------------------------------------------------ in process


def in_process(tmp_path: Path, scenario: Callable[..., Any]) -> None:
    """The dashboard's handlers on a real aiohttp server and plane, with a clock we move."""

    async def run() -> None:
        clock = FakeClock(1_000_000.0)
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
