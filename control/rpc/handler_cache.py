"""Wrapped gRPC handlers, made once per method instead of once per call.

An interceptor that wraps the handler on every call gives every upload and every agent
message a handler tuple, closures and a deserializer of its own, on the gateway's and
the server's hot paths (not measured apart: the saving is per call). The handler underneath
is the same object call after call (the server's method table), so the wrapping is
kept per method and made again only if that object changes. Bounded by the number of
methods the server serves.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import TypeAlias

import grpc

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class WrappedHandlers:
    def __init__(self, wrap: Callable[[str, Handler], Handler]) -> None:
        self._wrap = wrap
        self._by_method: dict[str, tuple[Handler, Handler]] = {}

    def get(self, method: str, handler: Handler) -> Handler:
        """``wrap(method, handler)``, made the first time this handler is seen."""
        known = self._by_method.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(method, handler)
        self._by_method[method] = (handler, wrapped)
        return wrapped


class WrappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """An interceptor that puts the handler of each method it covers behind a wrapper of
    its own (``_wrap``), made once per handler by ``WrappedHandlers``."""

    def __init__(self) -> None:
        self._wrapped = WrappedHandlers(self._wrap)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not self._covers(method, handler):
            return handler  # None: an unknown method, which gRPC answers UNIMPLEMENTED itself
        return self.wrapped(method, handler)

    def wrapped(self, method: str, handler: Handler) -> Handler:
        """``handler`` behind this interceptor's wrapper (made once per handler)."""
        return self._wrapped.get(method, handler)

    def _covers(self, method: str, handler: Handler) -> bool:
        """Whether ``method``'s calls go through the wrapper: every method's, unless a
        subclass says otherwise."""
        return True

    @abstractmethod
    def _wrap(self, method: str, handler: Handler) -> Handler:
        """``handler`` (``method``'s) with this interceptor's work around each call."""


def add_wrapped(
    server: grpc.aio.Server,
    service: str,
    handlers: Mapping[str, Handler],
    interceptor: WrappingInterceptor,
) -> None:
    """Register ``service``'s ``handlers`` (by method name) on ``server``, each behind
    ``interceptor``'s wrapper, instead of installing the interceptor.

    The wrapper is the same either way; installed as an interceptor, gRPC also runs
    ``intercept_service`` (a coroutine and a handler lookup) on every call before
    reaching it. For a server with one interceptor and one service (the ingest gateway,
    10,000 uploads in a burst) the wrapper alone is enough."""
    wrapped = {
        name: interceptor.wrapped(f"/{service}/{name}", handler)
        for name, handler in handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
    # In gRPC since 1.62 (found by name before the generic handlers); not in the stubs.
    server.add_registered_method_handlers(service, wrapped)  # type: ignore[attr-defined]
