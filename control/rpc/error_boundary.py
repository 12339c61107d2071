"""The one error boundary of every RPC: what an exception out of a handler becomes.

A domain error (``KillswitchError``) becomes the status ``STATUS_FOR_ERROR`` gives it,
with a one-line message; a store that cannot serve the call is UNAVAILABLE with the
``STORE_UNAVAILABLE_METADATA`` trailer, so a client can tell "the server is up but
cannot write" from "no server". Any other exception is a bug: INTERNAL, one line
naming the call, the traceback in the server's log and never to the client. A
handler's own ``context.abort`` (a status it chose) passes unchanged.

It is called from the one wrapper ``AuthorizationInterceptor`` (and ``EnrolmentGate``)
already puts around every handler, once per call, so no RPC can skip it and the hot
paths (an agent's stream, each upload) pay a try/except in a frame they already have.
On the control server it also keeps two promises of the operator API: a unary call
that names a hold, request or run this replica does not know is tried once more after
a re-read of the shared state (``Governance.found``); and a refused change, like any
permission denial, is audited like an accepted one.
"""

from __future__ import annotations

from collections.abc import Awaitable
from collections.abc import Callable
from typing import TYPE_CHECKING
from typing import Any
from typing import NoReturn

import grpc
import structlog

from control.errors import Conflict
from control.errors import InvalidInput
from control.errors import KillswitchError
from control.errors import NotFound
from control.errors import PermissionDenied
from control.errors import StoreError
from control.errors import UnknownItem
from control.errors import one_line
from control.rpc.authz import action_name
from control.rpc.authz import current_principal
from control.rpc.handler_cache import Handler
from control.wire import STORE_UNAVAILABLE_METADATA

if TYPE_CHECKING:
    from control.governance import Governance

log = structlog.get_logger("killswitch.rpc")

Context = grpc.aio.ServicerContext[Any, Any]
# What a call's exception becomes: the answer of a retry, or an abort with a status.
FailedCall = Callable[[Exception, Any, Context], Awaitable[Any]]

# The one table, first match wins: a subclass before its base.
STATUS_FOR_ERROR: tuple[tuple[type[KillswitchError], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    # The server is up, but cannot write (or reach) its store now: try again later.
    (StoreError, grpc.StatusCode.UNAVAILABLE),
    (KillswitchError, grpc.StatusCode.INTERNAL),
)


def status_for(error: KillswitchError) -> grpc.StatusCode:
    return next(code for kind, code in STATUS_FOR_ERROR if isinstance(error, kind))


async def abort_for(context: Context, error: KillswitchError) -> NoReturn:
    """End the call with ``error``'s status and one-line message: the boundary's last
    step, and a handler's that answers a domain error itself, unaudited (an agent's
    ``Connect`` whose store read failed: its retries are not worth an audit entry)."""
    trailing = ((STORE_UNAVAILABLE_METADATA, "1"),) if isinstance(error, StoreError) else ()
    await context.abort(status_for(error), one_line(error), trailing_metadata=trailing)
    raise AssertionError("unreachable: abort raises") from error


class ErrorBoundary:
    """Made once per server; ``for_call`` once per method, when its handler is wrapped.

    ``governance`` (the control server's) turns on the re-read of unknown items and the
    audit of failures; without it (the ingest gateway, the enrolment port, whose
    refusals are counted where they happen) errors are only translated.
    """

    def __init__(self, governance: Governance | None = None) -> None:
        self._governance = governance

    def for_call(self, method: str, handler: Handler, *, mutates: bool) -> FailedCall:
        """What an exception out of ``method``'s handler becomes; ``mutates``: its
        failures are audited (permission denials always are)."""
        governance = self._governance
        action = action_name(method)
        # Only a unary call can be made again: a stream may have answered already.
        again: Callable[..., Awaitable[Any]] | None = (
            handler.unary_unary if governance is not None else None
        )

        async def failed(error: Exception, request: Any, context: Context) -> Any:
            if isinstance(error, UnknownItem) and again is not None and governance is not None:
                try:
                    return await governance.found_after_resync(
                        error, lambda: again(request, context)
                    )
                except Exception as still:
                    error = still
            if isinstance(error, grpc.aio.AbortError):
                raise error  # the handler (or the interceptor) chose its status
            if not isinstance(error, KillswitchError):
                log.error("rpc_failed", method=method, exc_info=error)
                await context.abort(
                    grpc.StatusCode.INTERNAL, f"internal error in {action}: see the server log"
                )
            if governance is not None and (mutates or isinstance(error, PermissionDenied)):
                await _record_failure(governance, action, error)
            await abort_for(context, error)

        return failed


async def _record_failure(governance: Governance, action: str, error: KillswitchError) -> None:
    """Audit a refused call; a store that cannot write cannot take that entry either,
    and the caller must still hear why its call failed: then the log keeps it."""
    try:
        by = current_principal()
    except LookupError:
        return  # failed while being admitted (its refusal unwritten): nobody to name
    try:
        await governance.record_failure(by, action, error)
    except StoreError as unwritten:
        log.error(
            "failure_unaudited",
            action=action,
            by=by.name,
            error=one_line(error),
            cause=one_line(unwritten),
        )
