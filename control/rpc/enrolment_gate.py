"""The door of the enrolment port, which anyone who reaches it may knock on.

No certificate is needed there (the join token is the credential), so its limits
are the only thing between a flood and the store: each source address has a
token bucket of enrolment calls, and only so many enrolments run at once. A call
over either limit is refused with RESOURCE_EXHAUSTED before its CSR is parsed or
the store is asked about its token, and counted for the aggregated audit entry.

A refused call is answered only after about ``REFUSAL_DELAY_SECONDS`` (a tarpit), and each
connection carries at most ``MAX_STREAMS_PER_CONNECTION`` calls at once (HTTP/2's own
limit: further calls wait in the client). Answered at once, a flooding client sends its
next call at once, and the loop the control port shares spends itself on refusals
however cheap each is (3,000 calls in flight: CreateHold 3-7x slower at p50). Held,
such a client gets at most its streams' worth of calls a second through. A held call
costs a sleeping coroutine; past ``MAX_HELD`` of them, refusals are answered at once.
Each is held a different time, from half to one and a half times the delay: a flood's
calls arrive together, and answered together they would come back together, a wave of
hundreds the loop serves at once while an operator's call waits behind it (CreateHold's
p99 1.9-2.9x idle with fixed 1 s holds, 1.4-1.7x with spread 2 s ones).

A call that enrols gives its token back: a legitimate fleet enrolling thousands of
agents from one address (a NAT, the simulator) is bounded only by the concurrency
cap, while a caller whose calls fail runs out of tokens.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import grpc

from control.domain.limits import TokenBuckets
from control.rpc.authz import RefusalRecorder
from control.rpc.authz import Undecodable
from control.rpc.authz import action_name
from control.rpc.authz import peer_host
from control.rpc.authz import tolerant
from control.rpc.error_boundary import ErrorBoundary
from control.rpc.handler_cache import Handler
from control.rpc.handler_cache import WrappingInterceptor

# Per source: a burst of 64 enrolment calls (twice what one simulator runs at once),
# refilled at one a second; calls that enrol give theirs back.
ENROL_BURST = 64
ENROL_PER_SECOND = 1.0
# Enrolments running at once, from everyone: each costs a store write and a signature.
MAX_ENROLMENTS_IN_FLIGHT = 64
# The tarpit: how long a refusal is held on average, and how many may be held at once.
REFUSAL_DELAY_SECONDS = 2.0
MAX_HELD = 2048
# HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS of the enrolment port: half the simulator's 32
# enrolments at once per connection run, the rest wait their turn in the client.
MAX_STREAMS_PER_CONNECTION = 16


class EnrolmentGate(WrappingInterceptor):
    def __init__(
        self,
        refusals: RefusalRecorder,
        *,
        clock: Callable[[], float],
        burst: int = ENROL_BURST,
        per_second: float = ENROL_PER_SECOND,
        max_in_flight: int = MAX_ENROLMENTS_IN_FLIGHT,
        refusal_delay: float = REFUSAL_DELAY_SECONDS,
    ) -> None:
        super().__init__()
        self._refusals = refusals
        self._buckets = TokenBuckets(rate=per_second, burst=burst, clock=clock)
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._refusal_delay = refusal_delay
        self._held = 0
        # Translation only: the enrolment's own refusals are counted where they happen.
        self._errors = ErrorBoundary()

    def _covers(self, method: str, handler: Handler) -> bool:
        # The port serves one unary method; anything else is unimplemented.
        return handler.unary_unary is not None

    def _wrap(self, method: str, handler: Handler) -> Handler:
        action = action_name(method)
        # grpc-stubs type handlers with the synchronous context; this one is aio.
        behaviour: Any = handler.unary_unary
        failed = self._errors.for_call(method, handler, mutates=False)

        async def gated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            source = peer_host(context.peer())
            why = self._over_limit(source)
            if why:
                self._refusals.count_unauthenticated(None, source, action, why)
                await self._hold_refusal()
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
            if isinstance(request, Undecodable):  # INVALID_ARGUMENT, not gRPC's UNKNOWN
                self._refusals.count_unauthenticated(None, source, action, request.error)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
            self._in_flight += 1
            try:
                response = await behaviour(request, context)
            except Exception as error:
                await failed(error, request, context)
            finally:
                self._in_flight -= 1
            self._buckets.give_back(source)
            return response

        return grpc.unary_unary_rpc_method_handler(
            gated,
            request_deserializer=tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    async def _hold_refusal(self) -> None:
        if self._held >= MAX_HELD:
            return
        self._held += 1
        try:
            await asyncio.sleep(self._refusal_delay * random.uniform(0.5, 1.5))
        finally:
            self._held -= 1

    def _over_limit(self, source: str) -> str:
        if self._in_flight >= self._max_in_flight:
            return f"too many enrolments in progress ({self._max_in_flight}), retry shortly"
        if not self._buckets.take(source):
            return f"too many enrolment calls from {source}, retry shortly"
        return ""
