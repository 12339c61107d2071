"""Wrapped gRPC handlers, made once per method instead of once per call.

An interceptor that wraps the handler on every call gives every upload and every agent
message a handler tuple, closures and a deserializer of its own, on the gateway's and
the server's hot paths (not measured apart: the saving is per call). The handler underneath
is the same object call after call (the server's method table), so the wrapping is
kept per method and made again only if that object changes. Bounded by the number of
methods the server serves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

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
