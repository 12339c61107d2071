"""A real OpenID provider for the tests: the npm ``oidc-provider`` package on Node.js,
run by ``tests/oidc/provider.js``, and a killswitch server that signs people in with it.

The package is installed once per machine into ``.cache/oidc-provider`` (``npm install``
from the registry, or the local npm cache when offline). Without node or npm the
tests skip, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from control.web.actions import csrf_token
from control.web.login import SESSION_COOKIE
from tests.conftest import ServerProcess
from tests.conftest import free_port
from tests.conftest import missing_tool
from tests.conftest import terminate
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
PROVIDER_SCRIPT = Path(__file__).resolve().parent / "oidc" / "provider.js"
MODULES = ROOT / ".cache" / "oidc-provider"
PACKAGE = "oidc-provider@8"
CLIENT_ID = "killswitch-dashboard"
# Who the provider knows (tests/oidc/provider.js) and the role their groups give.
ROLE_FLAGS = [
    "--oidc-role", "incident-commanders=incident-commander",
    "--oidc-role", "approvers=approver",
    "--oidc-role", "sre=sre",
    "--oidc-role", "staff=employee",
]  # fmt: skip


@pytest.fixture(scope="session")
def oidc_provider_modules() -> Path:
    """The ``oidc-provider`` package, installed by npm the first time."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        missing_tool("the OpenID provider needs node and npm (apt-get install nodejs npm)")
    MODULES.mkdir(parents=True, exist_ok=True)
    # One install at a time: every xdist worker asks for the package in its own session,
    # and two npm installs into one prefix fail with ENOTEMPTY (seen in CI).
    with (MODULES / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (MODULES / "node_modules" / "oidc-provider" / "package.json").exists():
            result = subprocess.run(
                [npm, "install", "--prefix", str(MODULES), "--no-audit", "--no-fund", PACKAGE],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            if result.returncode != 0:
                missing_tool(f"npm could not install {PACKAGE}: {result.stderr.strip()[-500:]}")
    return MODULES


@dataclass
class SsoServer:
    server: ServerProcess
    issuer: str
    provider: subprocess.Popen[bytes]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"


@pytest.fixture
def sso_server(
    start_server: Callable[..., ServerProcess], oidc_provider_modules: Path, tmp_path: Path
) -> Iterator[Callable[..., SsoServer]]:
    """A killswitch server configured for SSO, and the provider it trusts.

    The issuer is ``localhost`` and the dashboard ``127.0.0.1``: two sites, as in a
    company, so the browser's SameSite rules are those of the real thing."""
    providers: list[subprocess.Popen[bytes]] = []

    def start(*extra: str) -> SsoServer:
        port = free_port()
        issuer = f"http://localhost:{port}"
        secret = tmp_path / "client-secret"
        secret.write_text("s3cret-for-tests\n")
        server = start_server(
            "--oidc-issuer", issuer, "--oidc-client-id", CLIENT_ID,
            "--oidc-client-secret-file", str(secret), *ROLE_FLAGS, *extra,
        )  # fmt: skip
        log = (tmp_path / "provider.log").open("ab")
        provider = subprocess.Popen(
            ["node", str(PROVIDER_SCRIPT), str(oidc_provider_modules), str(port), CLIENT_ID,
             "s3cret-for-tests", f"http://127.0.0.1:{server.http_port}/oidc/callback"],
            stdout=subprocess.PIPE, stderr=log,
        )  # fmt: skip
        providers.append(provider)
        assert provider.stdout is not None
        assert provider.stdout.readline().strip() == b"ready", "the provider did not start"
        return SsoServer(server, issuer, provider)

    yield start
    for provider in providers:
        terminate(provider)


def sso_sign_in(page: Any, base: str, login: str) -> None:
    """As a person would: the dashboard's SSO button, the provider's form, and back."""
    page.goto(f"{base}/")
    page.click("#sso-sign-in")
    page.wait_for_selector("input[name=login]", timeout=15_000)
    page.fill("input[name=login]", login)
    page.fill("input[name=password]", "any password")
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: not url.startswith("http://localhost"), timeout=15_000)


def signed_in_home(page: Any, base: str, login: str) -> None:
    sso_sign_in(page, base, login)
    page.wait_for_url(f"{base}/", timeout=15_000)
    wait_for(lambda: login in (page.text_content("header .who") or ""), 10, f"{login} signed in")


def post_form(page: Any, action: str, fields: dict[str, str]) -> tuple[int, str]:
    """Submit a form the page does not offer (what a forged or stale one would be), from
    the browser, with this session's cookie; the status and the page's text."""
    with page.expect_navigation() as navigation:
        page.evaluate(
            """([action, fields]) => {
              const form = document.createElement('form');
              form.method = 'post';
              form.action = action;
              for (const [name, value] of Object.entries(fields)) {
                const input = document.createElement('input');
                input.name = name;
                input.value = value;
                form.appendChild(input);
              }
              document.body.appendChild(form);
              form.submit();
            }""",
            [action, fields],
        )
    response = navigation.value
    return response.status, page.text_content("main") or ""


def csrf_of(page: Any) -> str:
    """The CSRF token of this browser's session, as the server derives it."""
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    return csrf_token(cookies[SESSION_COOKIE])
