"""A browser for the dashboard tests: plain HTTP with cookies, sign-in through a
one-time link, and a raw Server-Sent Events reader (no client library needed)."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from urllib.parse import urlencode
from urllib.parse import urlsplit

from control.web.login import LOGIN_COOKIE
from control.web.login import SESSION_COOKIE
from tests.conftest import Cli
from tests.conftest import ServerProcess


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
