"""Sign-in with the company's SSO, and actions in the dashboard, for every role.

A real headless Chromium, a real server and simulated fleet, and a real OpenID
provider (``tests/oidc/provider.js``, the npm ``oidc-provider`` package). Each role
does what the role table lets it, from the page, and is refused (403, audited under
its name) what it does not, from a form the page never offered it. With
``KILLSWITCH_SCREENSHOTS=1`` the pause dialog is saved as
``docs/dashboard-pause-dialog.png`` for the README (off by default: a test run leaves
the tree as it found it).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from control.domain.identity import Role
from control.domain.limits import AGGREGATED_ACTION
from control.errors import PermissionDenied
from control.refusals import AGGREGATION_SECONDS
from control.web.oidc import OidcSettings
from control.web.oidc import OpenIdProvider
from tests.conftest import BIN
from tests.conftest import Cli
from tests.conftest import Simulator
from tests.conftest import wait_for
from tests.oidc_support import CLIENT_ID
from tests.oidc_support import SsoServer
from tests.oidc_support import csrf_of
from tests.oidc_support import oidc_provider_modules  # noqa: F401 (fixtures)
from tests.oidc_support import post_form
from tests.oidc_support import signed_in_home
from tests.oidc_support import sso_server  # noqa: F401 (fixtures)
from tests.oidc_support import sso_sign_in
from tests.test_dashboard_browser import CHROMIUM
from tests.test_dashboard_browser import collect_problems
from tests.test_dashboard_browser import require_browser

AGENTS = 8
DOCS = Path(__file__).resolve().parent.parent / "docs"


def result_of(page: Any) -> str:
    page.wait_for_selector("#action-result", timeout=15_000)
    return str(page.text_content("#action-result"))


def actions_row(page: Any, base: str, selector: str) -> Any:
    """The row ``selector`` picks on the actions page, loaded afresh."""
    page.goto(f"{base}/actions")
    return page.locator(selector)


def ask_to_resume(ic: Any, base: str, hold_id: str) -> str:
    """The incident commander asks, from the hold's row; the new request's id."""
    row = actions_row(ic, base, f'#resume-holds tr[data-hold-id="{hold_id}"]')
    row.locator("input[name=reason]").fill("keys rotated")
    row.locator("input[name=ticket]").fill("INC-7")
    row.locator("button").click()
    asked = result_of(ic)
    assert "(revision 1)" in asked, asked
    return asked.split()[2]


def audited(cli: Cli) -> list[dict[str, Any]]:
    return list(cli.as_("sre-1").json("audit"))


def test_every_role_signs_in_with_sso_and_does_only_what_its_role_allows(
    sso_server: Callable[..., SsoServer],  # noqa: F811
    simulate: Callable[..., Simulator],
    tmp_path: Path,
) -> None:
    sync_api = require_browser()
    sso = sso_server()
    cli, base = Cli(sso.server), sso.base
    truth_path = tmp_path / "truth.json"
    sim = simulate(sso.server, AGENTS,
                   "--fault", "lie=0.125", "--fault-after", "3600", "--truth", str(truth_path),
                   "--capture-tick", "0.2", "--upload-every", "1", "--seed", "3")  # fmt: skip
    wait_for(
        lambda: cli.json("status")["agents"]["by_state"].get("CAPTURING") == AGENTS,
        60,
        "the fleet capturing",
    )

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)

        def person(login: str) -> Any:
            page = browser.new_context(viewport={"width": 1100, "height": 760}).new_page()
            signed_in_home(page, base, login)
            return page

        try:
            # The incident commander: a preview, a typed number, then the pause.
            ic = person("dana-ic")
            problems = collect_problems(ic)
            ic.click("#actions-link")
            ic.check("#scope-selector")
            ic.fill("#pause-selector", "owner=employee-1")
            ic.fill("#pause-reason", "one laptop")
            ic.click("#pause-preview")
            assert ic.text_content("#pause-count") == "This pauses 1 laptop."
            ic.click("text=Back to actions")
            ic.fill("#pause-reason", "credential leak")
            ic.fill("#pause-ticket", "INC-7")
            ic.click("#pause-preview")
            ic.wait_for_selector("#pause-count")
            assert ic.text_content("#pause-count") == f"This pauses {AGENTS} laptops."
            ic.fill("#pause-confirm", "8")
            if os.environ.get("KILLSWITCH_SCREENSHOTS") == "1":
                ic.screenshot(path=str(DOCS / "dashboard-pause-dialog.png"))
            ic.fill("#pause-confirm", str(AGENTS - 1))  # mistyped: nothing happens
            ic.click("#pause-go")
            ic.wait_for_selector("#pause-retype")
            assert cli.json("status")["holds"] == []
            ic.fill("#pause-confirm", str(AGENTS))
            ic.click("#pause-go")
            done = result_of(ic)
            assert done.endswith(f"it pauses {AGENTS} laptops."), done
            hold_id = done.split()[1]
            sim.proc.send_signal(signal.SIGUSR1)  # the liar captures on, in secret
            (liar,) = [
                row["agent_id"]
                for row in json.loads(truth_path.read_text())["agents"]
                if row["fault"] == "lie"
            ]
            created = [e for e in audited(cli) if e["action"] == "hold.create"]
            assert [(e["actor"], e["role"], e["ticket"]) for e in created] == [
                ("dana-ic", "incident-commander", "INC-7")
            ]

            # ... acknowledges the liar's violation ...
            wait_for(lambda: cli.agents()[liar]["state"] == "VIOLATION", 60, "the liar caught")
            row = actions_row(ic, base, f'#violations tr[data-agent-id="{liar}"]')
            row.locator("input[name=note]").fill("wiped and re-imaged")
            row.locator("button").click()
            assert result_of(ic) == f"The violation on {liar} is acknowledged."

            # ... and asks to resume; approving is not theirs to do.
            request_id = ask_to_resume(ic, base, hold_id)
            assert problems == [], problems  # no script errors, no CSP violations
            status, text = post_form(
                ic, "/actions/approve",
                {"csrf": csrf_of(ic), "request_id": request_id, "revision": "1"},
            )  # fmt: skip
            assert status == 403 and "may not call Operator.ApproveResume" in text, text
            status, text = post_form(
                ic, "/actions/pause",
                {"csrf": "forged", "scope": "all", "reason": "x", "confirm": str(AGENTS)},
            )  # fmt: skip
            assert status == 403 and "CSRF" in text, text

            # The approver sees the request and its revision, may not pause, approves.
            approver = person("ari-approver")
            row = actions_row(approver, base, f'#requests tr[data-request-id="{request_id}"]')
            assert row.locator(".revision").text_content() == "1"
            assert hold_id in (row.text_content() or "")
            assert "dana-ic" in (row.text_content() or "")
            status, text = post_form(
                approver, "/actions/pause/preview",
                {"csrf": csrf_of(approver), "scope": "all", "reason": "mine"},
            )  # fmt: skip
            assert status == 403 and "may not call Operator.CreateHold" in text, text
            row = actions_row(approver, base, f'#requests tr[data-request-id="{request_id}"]')
            row.locator('form[action="/actions/deny"] input[name=note]').fill("not yet")
            row.locator("text=Deny").click()
            assert result_of(approver) == f"Request {request_id} is denied."
            request_id = ask_to_resume(ic, base, hold_id)
            row = actions_row(approver, base, f'#requests tr[data-request-id="{request_id}"]')
            row.locator("text=Approve revision 1").click()
            assert f"Request {request_id} approved: hold lifted at epoch" in result_of(approver)
            assert cli.json("status")["holds"] == []

            # The SRE watches: no actions offered, and none taken.
            sre = person("sam-sre")
            sre.goto(f"{base}/actions")
            sre.wait_for_selector("#no-actions")
            csrf = csrf_of(sre)
            for action, fields in [
                ("/actions/pause/preview", {"scope": "all", "reason": "sre"}),
                ("/actions/resume", {"hold_id": hold_id, "reason": "sre"}),
                ("/actions/acknowledge", {"agent_id": liar, "note": "sre"}),
            ]:
                status, text = post_form(sre, action, {"csrf": csrf, **fields})
                assert status == 403 and "role sre may not call" in text, (action, text)

            # An employee opts their own laptop out and back in, and nobody else's.
            employee = person("employee-1")
            employee.goto(f"{base}/actions")
            rows = employee.eval_on_selector_all(
                "#my-laptops tbody tr", "rows => rows.map(r => r.dataset.agentId)"
            )
            assert rows == ["laptop-00000"]
            employee.click("#my-laptops >> text=Opt out")
            assert result_of(employee) == "laptop-00000 is opted out: capture stops on it."
            opt_outs = [h for h in cli.json("status")["holds"] if h["kind"] == "opt_out"]
            assert [h["created_by"] for h in opt_outs] == ["employee-1"]
            employee.goto(f"{base}/actions")
            employee.click("#my-laptops >> text=Opt back in")
            assert result_of(employee) == "laptop-00000 is opted back in."
            csrf = csrf_of(employee)
            status, text = post_form(
                employee, "/actions/opt-out", {"csrf": csrf, "agent_id": "laptop-00001"}
            )
            assert status == 403 and "employee-1 does not own a laptop" in text, text
            status, text = post_form(
                employee, "/actions/pause/preview", {"csrf": csrf, "scope": "all", "reason": "x"}
            )
            assert status == 403 and "role employee may not call" in text, text

            # Someone in no mapped group is told so, and gets no session.
            contractor = browser.new_context().new_page()
            sso_sign_in(contractor, base, "casey-contractor")
            contractor.wait_for_selector("#unmapped")
            assert "contractors" in (contractor.text_content("#unmapped") or "")
            contractor.goto(f"{base}/")
            assert "Log in to the dashboard" in (contractor.text_content("h1") or "")
        finally:
            browser.close()

    # Everything above is in the audit log, under each person's own name.
    audit = audited(cli)
    done_by = {(e["actor"], e["action"]) for e in audit if e["result"] == "ok"}
    assert {
        ("dana-ic", "hold.create"),
        ("ari-approver", "resume.approve"),
        ("ari-approver", "resume.deny"),
        ("employee-1", "hold.lift"),
    } <= done_by, done_by
    denied = {(e["actor"], e["action"]) for e in audit if e["result"].startswith("denied")}
    assert {
        ("dana-ic", "Operator.ApproveResume"),
        ("ari-approver", "Operator.CreateHold"),
        ("sam-sre", "Operator.CreateHold"),
        ("sam-sre", "Operator.RequestResume"),
        ("sam-sre", "Operator.AcknowledgeViolation"),
        ("employee-1", "Operator.CreateHold"),
    } <= denied, denied
    # Nobody was signed in: counted with the refusals before authentication, written as
    # one aggregated entry per source and interval (control/refusals.py).
    wait_for(
        lambda: any(
            e["action"] == AGGREGATED_ACTION
            and "Dashboard.SignIn: no role for the groups of casey-contractor" in e["detail"]
            for e in audited(cli)
        ),
        AGGREGATION_SECONDS + 10,
        "the unmapped sign-in audited",
    )


class NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


def fetch(url: str, cookie: str = "") -> tuple[int, dict[str, str], str]:
    opener = urllib.request.build_opener(NoRedirects)
    request = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})
    try:
        with opener.open(request, timeout=20) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def test_sso_sign_in_uses_pkce_and_refuses_what_this_browser_did_not_start(
    sso_server: Callable[..., SsoServer],  # noqa: F811
) -> None:
    sso = sso_server()
    status, headers, _ = fetch(f"{sso.base}/oidc/login")
    assert status == 303
    sent = urllib.parse.parse_qs(urllib.parse.urlsplit(headers["Location"]).query)
    assert headers["Location"].startswith(f"{sso.issuer}/auth?")
    assert sent["client_id"] == [CLIENT_ID] and sent["code_challenge_method"] == ["S256"]
    assert sent["nonce"] and sent["state"] and sent["code_challenge"]
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/oidc/callback" in cookie
    flow = cookie.split(";")[0]
    state = sent["state"][0]

    # A callback this browser did not start (login CSRF): no cookie, or another state.
    for url, with_cookie in [
        (f"{sso.base}/oidc/callback?code=c&state={state}", ""),
        (f"{sso.base}/oidc/callback?code=c&state=someone-elses", flow),
    ]:
        status, headers, text = fetch(url, with_cookie)
        assert status == 403 and "not started from this browser" in text
        assert "killswitch_session" not in headers.get("Set-Cookie", "")
    # The right state, but a code the provider never issued: the provider says no.
    status, headers, text = fetch(f"{sso.base}/oidc/callback?code=forged&state={state}", flow)
    assert status == 403 and "refused the sign-in: invalid_grant" in text, text
    assert "killswitch_session=" not in headers.get("Set-Cookie", "").replace(
        "killswitch_session=;", ""
    )
    # The answer of another provider (RFC 9207 iss) is refused before any exchange.
    status, _, text = fetch(
        f"{sso.base}/oidc/callback?code=c&state={state}&iss=https://evil.example", flow
    )
    assert status == 403 and "another provider" in text


def test_serve_refuses_half_an_sso_configuration(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "killswitch"), "serve", "--insecure", "--data-dir", str(tmp_path),
         "--oidc-issuer", "http://localhost:1", "--oidc-role", "ops=incident-commander"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "killswitch: error: SSO needs --oidc-issuer, --oidc-client-id,"
        " --oidc-client-secret-file and at least one --oidc-role GROUP=ROLE"
    ]
    result = subprocess.run(
        [str(BIN / "killswitch"), "serve", "--insecure", "--data-dir", str(tmp_path),
         "--oidc-issuer", "http://localhost:1", "--oidc-client-id", "x",
         "--oidc-client-secret-file", str(tmp_path / "none"),
         "--oidc-role", "robots=automation"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "--oidc-role 'robots=automation'" in result.stderr


def test_a_tampered_nonce_or_pkce_verifier_gets_no_session(
    sso_server: Callable[..., SsoServer],  # noqa: F811
) -> None:
    """The flow cookie's nonce must match the ID token's, and its PKCE verifier the
    challenge sent: change either (as a stolen or injected code would need) and the
    sign-in fails, on our check for the nonce and on the provider's for PKCE."""
    sync_api = require_browser()
    sso = sso_server()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            for part, refusal in [
                (1, "the ID token is not valid"),
                (2, "the provider refused the sign-in: invalid_grant"),
            ]:
                page = browser.new_context().new_page()
                page.goto(f"{sso.base}/")
                page.click("#sso-sign-in")
                page.wait_for_selector("input[name=login]", timeout=15_000)
                (flow,) = [c for c in page.context.cookies() if c["name"] == "killswitch_oidc"]
                pieces = flow["value"].split(".")
                pieces[part] = ("A" if pieces[part][0] != "A" else "B") + pieces[part][1:]
                page.context.add_cookies([{**flow, "value": ".".join(pieces)}])
                page.fill("input[name=login]", "dana-ic")
                page.fill("input[name=password]", "any")
                page.click("button[type=submit]")
                page.wait_for_url(lambda url: "/oidc/callback" in url, timeout=15_000)
                assert refusal in (page.text_content("main") or "")
                page.goto(f"{sso.base}/")
                assert "Log in to the dashboard" in (page.text_content("h1") or "")
        finally:
            browser.close()


def test_an_id_token_not_signed_by_the_issuer_is_refused(
    sso_server: Callable[..., SsoServer],  # noqa: F811
) -> None:
    sso = sso_server()
    settings = OidcSettings(sso.issuer, CLIENT_ID, "unused", (("staff", Role.EMPLOYEE),))
    with urllib.request.urlopen(f"{sso.issuer}/jwks", timeout=20) as response:
        kid = json.load(response)["keys"][0]["kid"]
    now = int(time.time())
    claims = {"iss": sso.issuer, "aud": CLIENT_ID, "sub": "dana-ic", "iat": now,
              "exp": now + 300, "nonce": "n", "groups": ["incident-commanders"]}  # fmt: skip
    # The issuer's key id, but another key; and no signature at all.
    impostor = RSAKey.generate_key(2048, parameters={"kid": kid})
    forged = jwt.encode({"alg": "RS256", "kid": kid}, claims, impostor)

    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    unsigned = f"{b64({'alg': 'none'})}.{b64(claims)}."
    for token in (forged, unsigned):
        with pytest.raises(PermissionDenied, match="the ID token is not valid"):
            asyncio.run(OpenIdProvider(settings).verify(token, "n"))
