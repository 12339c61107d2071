"""Parsing and vetting of HOST:PORT listen addresses."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from control.errors import InvalidInput
from control.errors import KillswitchError


def split_host_port(address: str, *, what: str) -> tuple[str, int]:
    host, sep, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise InvalidInput(f"bad {what} address {address!r}: expected HOST:PORT")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_loopback(address: str, *, what: str) -> tuple[str, int]:
    """An insecure (no mTLS) API is unauthenticated, so it stays on this host."""
    host, port = split_host_port(address, what=what)
    if not is_loopback(host):
        raise InvalidInput(
            f"refusing to listen on {address} for {what} with --insecure: without mTLS the"
            " API is unauthenticated, so it may only listen on loopback (127.0.0.1, ::1,"
            " localhost)"
        )
    return host, port


def ensure_can_listen(host: str, port: int, *, what: str) -> None:
    """Fail with one clear line before gRPC's own bind logs a C-level error."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise KillswitchError(
                f"cannot listen on {host}:{port} for {what}: {exc.strerror}"
            ) from None


def dashboard_public_url(text: str) -> str:
    """``serve --public-url``: the dashboard's address as browsers reach it (often a TLS
    proxy in front of ``--http``), as ``scheme://host[:port]`` with no trailing slash.

    Login links start with it, and an https one makes session cookies ``Secure``.
    """
    parts = urlsplit(text.strip())
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number in range)
    except ValueError:
        parts = parts._replace(scheme="")
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise InvalidInput(
            f"bad --public-url {text!r}: expected http(s)://HOST[:PORT], with no path"
        )
    return f"{parts.scheme}://{parts.netloc}"
