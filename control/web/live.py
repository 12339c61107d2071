"""``GET /api/events``: the dashboard's live updates, as Server-Sent Events.

One message a second: the overview and which agents changed (by timeline version),
so a page re-reads only its own rows. One stream per session; slots are shared out
per person (``streams.py``). A page that gets no slot polls instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from control.domain.identity import Principal
from control.plane import ControlPlane
from control.web import api
from control.web.headers import harden
from control.web.login import SESSION_COOKIE
from control.web.sessions import DashboardSessions
from control.web.streams import Stream
from control.web.streams import StreamSlots
from control.web.timeline import ALL_AGENTS
from control.web.timeline import Timeline

# Live views: one message a second.
TICK_SECONDS = 1.0
# More changed agents than this in one tick: "re-read your page" instead of a list.
MAX_CHANGED_SENT = 200


class LiveUpdates:
    def __init__(
        self,
        plane: ControlPlane,
        sessions: DashboardSessions,
        timeline: Timeline,
        *,
        summary: Callable[[Principal], tuple[dict[str, Any], str]],
    ) -> None:
        """``summary``: the overview for a person's audience, and the same as JSON."""
        self._plane = plane
        self._sessions = sessions
        self._timeline = timeline
        self._summary = summary
        self._streams = StreamSlots()
        self._closing = asyncio.Event()

    def close(self) -> None:
        """End live streams now (the server is stopping) instead of at the HTTP grace period."""
        self._closing.set()
        self._streams.stop_all()

    async def events(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        session_id = request.cookies.get(SESSION_COOKIE, "")
        stream = None if self._closing.is_set() else self._streams.take(session_id, principal)
        if stream is None:
            response = web.json_response(
                {"error": "too many live views open; this page will poll instead"}, status=503
            )
            response.headers["Retry-After"] = "10"
            return response
        since = self._timeline.version
        text = request.headers.get("Last-Event-ID") or request.query.get("since", "")
        if text.isdigit() and len(text) < 19:
            since = min(int(text), since)
        try:
            return await self._stream_events(request, principal, session_id, stream, since)
        finally:
            self._streams.release(session_id, stream)

    def _visible_changes(self, principal: Principal, since: int) -> tuple[int, list[str] | None]:
        changes = self._timeline.changes_since(since)
        ids = changes.agent_ids
        if ids is None or len(ids) > MAX_CHANGED_SENT:
            return changes.version, None
        if api.is_employee(principal):
            # Never name someone else's laptop; a hold change may touch theirs too.
            ids = frozenset(
                a
                for a in ids
                if a == ALL_AGENTS or api.visible_agent(self._plane, a, principal) is not None
            )
        return changes.version, sorted(ids)

    async def _stream_events(
        self,
        request: web.Request,
        principal: Principal,
        session_id: str,
        stream: Stream,
        since: int,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
        )
        harden(response)
        await response.prepare(request)
        try:
            await response.write(b"retry: 3000\n\n")
            while not stream.stop.is_set() and not _client_gone(request):
                if await self._sessions.principal(session_id) is None:
                    await response.write(b"event: logout\ndata: {}\n\n")
                    break
                version, changed = self._visible_changes(principal, since)
                since = version
                _, summary = self._summary(principal)
                message = (
                    f'{{"version": {version}, "changed": {json.dumps(changed)},'
                    f' "summary": {summary}}}'
                )
                await response.write(f"id: {version}\ndata: {message}\n\n".encode())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TICK_SECONDS):  # cancellable, unlike 3.11's wait_for
                        await stream.stop.wait()
            if stream.replaced:
                # The same session opened a newer stream: this page polls instead of
                # reconnecting (which would in turn replace the newer one).
                await response.write(b"event: replaced\ndata: {}\n\n")
        except (ConnectionResetError, ConnectionError):
            pass  # the browser went away
        return response


def _client_gone(request: web.Request) -> bool:
    """The browser left, or the server is shutting down (aiohttp closes every connection,
    then waits for handlers: a live stream must notice and end)."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return True
    protocol = request.protocol
    return bool(protocol._close or protocol._force_close)
