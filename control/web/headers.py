"""The security headers every response of the dashboard carries.

One function, imported by every part of the dashboard that answers a request (pages,
login, SSO, actions, live updates, exports), so that no route can be added without
them and no part has to be handed them.
"""

from __future__ import annotations

from aiohttp import web

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self';"
        " object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def harden(response: web.StreamResponse, *, cache: bool = False) -> web.StreamResponse:
    """Security headers on every response of the dashboard (before it is sent)."""
    if not response.prepared:
        response.headers.update(SECURITY_HEADERS)
        if not cache:
            response.headers["Cache-Control"] = "no-store"
    return response
