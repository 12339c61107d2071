"""A hold another replica committed a moment ago is not "unknown" here: read, then retry.

In-process: the RPC error boundary (``ErrorBoundary``) and ``Governance.resync``.
"""

from __future__ import annotations

import asyncio
import types
from typing import Any
from typing import cast

import grpc
import pytest

from control.errors import StoreError
from control.errors import UnknownItem
from control.governance import Governance
from control.rpc.error_boundary import ErrorBoundary


def governance(resync: Any) -> Governance:
    async def archived_hold(hold_id: str) -> None:
        return None  # nothing archived: an unknown hold stays unknown

    # The refusal log's writer, and the archive an unknown item is explained from.
    store = types.SimpleNamespace(append_audit=None, archived_hold=archived_hold)
    return Governance(None, store, clock=lambda: 0.0, authority=None, resync=resync)  # type: ignore[arg-type]


class LaggingReplica:
    """Knows the hold only once it has re-read the shared state."""

    def __init__(self) -> None:
        self.calls = 0
        self.has_read = False

        async def resync() -> None:
            self.has_read = True

        self.governance = governance(resync)

    async def resume(self, request: str, context: Any) -> str:
        self.calls += 1
        if not self.has_read:
            raise UnknownItem(UnknownItem.HOLD, request)
        return f"resumed {request}"


def test_an_unknown_hold_is_looked_for_again_after_a_re_read() -> None:
    """As the authorisation interceptor's wrapper calls it: first bare, then the boundary."""
    replica = LaggingReplica()
    handler = grpc.unary_unary_rpc_method_handler(replica.resume)
    failed = ErrorBoundary(replica.governance).for_call(
        "/killswitch.v1.Operator/Resume", handler, mutates=False
    )

    async def call() -> str:
        try:
            return await replica.resume("hold-1", None)
        except Exception as error:
            answer: str = await failed(error, "hold-1", cast(Any, None))
            return answer

    assert asyncio.run(call()) == "resumed hold-1"
    assert replica.calls == 2


def test_resync_says_whether_the_re_read_worked() -> None:
    async def fails() -> None:
        raise StoreError("store unreachable")

    async def works() -> None:
        pass

    assert asyncio.run(governance(works).resync()) is True
    assert asyncio.run(governance(fails).resync()) is False
    assert asyncio.run(governance(None).resync()) is False


def test_found_retries_once_and_an_item_unknown_to_the_store_stays_unknown() -> None:
    """What the dashboard's forms and proof reports go through, as the gRPC calls do."""
    reads: list[str] = []

    async def resync() -> None:
        reads.append("read")

    async def never_known() -> str:
        raise UnknownItem(UnknownItem.HOLD, "hold-x")

    async def known_after_a_read() -> str:
        if not reads:
            raise UnknownItem(UnknownItem.HOLD, "hold-y")
        return "found hold-y"

    assert asyncio.run(governance(resync).found(known_after_a_read)) == "found hold-y"
    assert reads == ["read"]
    with pytest.raises(UnknownItem):
        asyncio.run(governance(resync).found(never_known))
    assert reads == ["read", "read"], "one re-read per call, then the answer stands"
