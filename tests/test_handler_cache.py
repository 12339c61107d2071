"""Interceptors wrap each method's handler once, and again only if it changes."""

from __future__ import annotations

from typing import Any

import grpc

from control.rpc.handler_cache import Handler
from control.rpc.handler_cache import WrappedHandlers


def handler(answer: str) -> Handler:
    return grpc.unary_unary_rpc_method_handler(lambda request, context: answer)


def test_a_method_is_wrapped_once_while_its_handler_stays_the_same() -> None:
    made: list[tuple[str, Handler]] = []

    def wrap(method: str, inner: Handler) -> Handler:
        made.append((method, inner))
        behaviour: Any = inner.unary_unary
        return grpc.unary_unary_rpc_method_handler(lambda r, c: f"wrapped {behaviour(r, c)}")

    cache = WrappedHandlers(wrap)
    first, second = handler("one"), handler("two")
    a = cache.get("/s/A", first)
    assert cache.get("/s/A", first) is a
    assert len(made) == 1
    b = cache.get("/s/B", first)
    assert b is not a and len(made) == 2
    replaced = cache.get("/s/A", second)  # a new handler under the same name: wrapped anew
    assert replaced is not a and len(made) == 3
    behaviour: Any = replaced.unary_unary
    assert behaviour(None, None) == "wrapped two"
