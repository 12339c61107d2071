"""Who holds the dashboard's live-update streams, and who may open one more.

Streams are capped (each holds a connection and wakes every tick), so the cap must
not let one person lock everyone else out, as one employee with eight sessions once
took all 32 slots and an SRE got 503. So: one stream per session (a new one from the
same session replaces the old, which is told and ends: a browser's newest tab stays
live, older tabs poll), a few per person, and employees together never take the
slots kept for the people running the incident.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from dataclasses import field

from control.domain.identity import Principal
from control.domain.identity import Role

MAX_EVENT_STREAMS = 32
MAX_STREAMS_PER_USER = 4
# Slots only incident commanders, approvers and SREs can take.
OPERATOR_RESERVED_STREAMS = 8


@dataclass(slots=True)
class Stream:
    """One open stream; ``stop`` is set when it must end (replaced, or the server stops)."""

    user: str
    employee: bool
    replaced: bool = False
    stop: asyncio.Event = field(default_factory=asyncio.Event)


class StreamSlots:
    def __init__(self) -> None:
        self._by_session: dict[str, Stream] = {}

    def take(self, session_id: str, principal: Principal) -> Stream | None:
        """A slot for this session's new stream (ending its old one), or None if none is free."""
        old = self._by_session.pop(session_id, None)
        if old is not None:
            old.replaced = True
            old.stop.set()
        user = f"{principal.role.value}:{principal.name}"
        employee = principal.role is Role.EMPLOYEE
        streams = self._by_session.values()
        if (
            len(self._by_session) >= MAX_EVENT_STREAMS
            or sum(s.user == user for s in streams) >= MAX_STREAMS_PER_USER
            or (
                employee
                and sum(s.employee for s in streams)
                >= MAX_EVENT_STREAMS - OPERATOR_RESERVED_STREAMS
            )
        ):
            return None
        stream = Stream(user, employee)
        self._by_session[session_id] = stream
        return stream

    def release(self, session_id: str, stream: Stream) -> None:
        if self._by_session.get(session_id) is stream:
            del self._by_session[session_id]

    def stop_all(self) -> None:
        for stream in self._by_session.values():
            stream.stop.set()
