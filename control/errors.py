"""One exception hierarchy for the whole control plane.

Adapters translate these into their own vocabulary (gRPC status codes, CLI exit
codes) in one place each, so a user always sees a one-line message.
"""

from __future__ import annotations

import reprlib


class KillswitchError(Exception):
    """Base class: every error the product raises on purpose."""


class InvalidInput(KillswitchError):
    """The request itself is wrong (bad selector, empty reason, ...)."""


class NotFound(KillswitchError):
    """The named object (hold, agent) does not exist."""


class UnknownItem(NotFound):
    """A hold, resume request or runbook run this server does not hold in memory: the
    RPC layer asks the archive whether it is history that was compacted away."""

    HOLD = "hold"
    REQUEST = "resume request"
    RUN = "run"

    def __init__(self, kind: str, item_id: str) -> None:
        super().__init__(f"unknown {kind} {shown(item_id)}")
        self.kind = kind
        self.item_id = item_id


class Conflict(KillswitchError):
    """The request is valid but contradicts current state (hold already lifted, ...)."""


class StoreError(KillswitchError):
    """The durable store failed or holds data this version cannot read."""


class StoreUnavailable(StoreError):
    """The store cannot take writes (or cannot be reached) now: the server is up, but it
    must not promise anything it cannot write down. The message is the one-line cause
    (``control.store.causes``), the same in the log, on ``/readyz`` and to a caller."""

    def __init__(self, cause: str, *, cannot_write: bool) -> None:
        super().__init__(cause)
        self.cause = cause
        # True: a write failed for a reason that does not pass by itself (disk full, read
        # only): the store is unhealthy at once, without waiting for the next beat.
        self.cannot_write = cannot_write


class PermissionDenied(KillswitchError):
    """The caller's role or identity does not allow this action."""


# ------------------------------------------------------------------ seen by a client
# (``control.client`` raises these from a failed call; the CLI gives each an exit code.)


class ServerUnreachable(KillswitchError):
    """A client could not reach the control server (refused, no route, TLS handshake)."""


class ServerTimedOut(ServerUnreachable):
    """The control server did not answer a client's call in time."""


class ServerStoreUnavailable(KillswitchError):
    """The control server answered, but its store cannot serve the call now: nothing was
    done. (Not ``StoreUnavailable``: that is the server's own store failing, in-process.)"""


MAX_SHOWN_CHARS = 60
MAX_MESSAGE_CHARS = 500


# Containers are quoted through reprlib, which stops after a few items: a caller's
# nested list is never turned into text whole just to be clipped (an expanded YAML
# alias bomb once took seconds of repr here).
_EXCERPT = reprlib.Repr()
_EXCERPT.maxlevel, _EXCERPT.maxstring, _EXCERPT.maxother = 3, MAX_SHOWN_CHARS, MAX_SHOWN_CHARS


def shown(value: object) -> str:
    """A caller's value quoted in an error, clipped: a message must stay one short line."""
    if isinstance(value, str):
        text = repr(value[: MAX_SHOWN_CHARS + 1])
    elif isinstance(value, int) and value.bit_length() > 256:  # repr refuses past 4300 digits
        text = f"a {value.bit_length()}-bit number"
    else:
        text = _EXCERPT.repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else f"{text[: MAX_SHOWN_CHARS - 5]}...{text[-1]}"


def one_line(error: Exception) -> str:
    """The message a client sees: one line, bounded, whatever went into it."""
    text = " ".join(str(error).split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."
