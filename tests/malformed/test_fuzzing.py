"""Hypothesis against the real server: every answer clean, nothing changed, all still up."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from killswitch.v1 import killswitch_pb2 as pb

from control.domain.limits import AGGREGATED_ACTION
from control.refusals import AGGREGATION_SECONDS
from tests.conftest import wait_for
from tests.malformed.calls import AUTHORIZE_UPLOAD
from tests.malformed.calls import CONNECT
from tests.malformed.calls import FUZZ_AGENT
from tests.malformed.calls import IC
from tests.malformed.calls import INGEST
from tests.malformed.calls import OPERATOR
from tests.malformed.calls import bidi
from tests.malformed.calls import call
from tests.malformed.calls import check
from tests.malformed.calls import unary
from tests.malformed.fleet import Fleet
from tests.malformed.strategies import FUZZ
from tests.malformed.strategies import RAW_TARGETS
from tests.malformed.strategies import OperatorCall
from tests.malformed.strategies import agent_streams
from tests.malformed.strategies import operator_mutations
from tests.malformed.strategies import operator_reads
from tests.malformed.strategies import self_service_calls
from tests.malformed.strategies import upload_requests
from tests.malformed.strategies import wire_messages

# One worker runs every malformed-input module: they share the session's fleet
# (tests/malformed/conftest.py), which each worker would otherwise build for itself.
pytestmark = pytest.mark.xdist_group("malformed")


def examples(weight: float) -> int:
    """A property's examples: each is a real gRPC call, so a quarter of the profile's
    (tests/conftest.py), by weight: 20-25 by default, 125-250 with HYPOTHESIS_PROFILE=large."""
    return max(20, round(settings().max_examples * weight / 4))


def fuzz(
    fleet: Fleet,
    weight: float,
    example: Callable[..., None],
    *strategies: st.SearchStrategy[Any],
) -> None:
    """``example`` on what ``strategies`` draw, ``examples(weight)`` times against the real
    server, the fleet's clock ticked after each; then nothing may have changed: what every
    property here holds, so that no property forgets to check it."""

    @settings(FUZZ, max_examples=examples(weight))
    @given(st.tuples(*strategies))
    def run(drawn: tuple[Any, ...]) -> None:
        example(*drawn)
        fleet.tick()

    run()
    fleet.assert_state_unchanged()


def test_fuzz_operator_mutations_are_refused_and_audited(fleet: Fleet) -> None:
    start = fleet.snapshot().audit_head
    refused: Counter[str] = Counter()

    def mutate(data: st.DataObject) -> None:
        identity, path, message = data.draw(operator_mutations(fleet))
        outcome = unary(fleet.channels[identity], path, message)
        check(outcome, (identity, path, message))
        assert outcome.code is not grpc.StatusCode.OK, f"accepted: {path} {message!r:.300}"
        if outcome.code is not grpc.StatusCode.RESOURCE_EXHAUSTED:  # not refused by gRPC itself
            refused[f"{identity} {path.rsplit('/', 1)[1]}"] += 1

    fuzz(fleet, 1, mutate, st.data())
    # Refused changes are audited (how many is not asserted: the fuzzing decides), one by
    # one within each identity's refusal budget, past it in an aggregated entry.
    wanted = {(key.split()[0], f"Operator.{key.split()[1]}") for key in refused}

    def unaudited() -> set[tuple[str, str]]:
        audited: set[tuple[str, str]] = set()
        for entry in fleet.audit_since(start):
            if entry.action == AGGREGATED_ACTION:
                reasons = re.findall(r"\d+ x (\S+): ", entry.detail)
                audited |= {(entry.actor, action) for action in reasons}
            elif entry.result != "ok":
                audited.add((entry.actor, entry.action))
        return wanted - audited

    wait_for(lambda: not unaudited(), AGGREGATION_SECONDS + 10, "refusals audited")


def test_fuzz_operator_reads(fleet: Fleet) -> None:
    def read(data: st.DataObject) -> None:
        identity, path, message = data.draw(operator_reads(fleet))
        check(call(fleet.channels[identity], path, message), (path, message))

    fuzz(fleet, 0.75, read, st.data())


def test_fuzz_self_service(fleet: Fleet) -> None:
    def ask(request: OperatorCall) -> None:
        identity, path, message = request
        outcome = unary(fleet.channels[identity], path, message)
        check(outcome, request)
        if not path.endswith("/ListMyLaptops"):
            assert outcome.code is not grpc.StatusCode.OK, f"accepted: {request!r:.300}"

    fuzz(fleet, 0.5, ask, self_service_calls())


def test_fuzz_agent_streams(fleet: Fleet) -> None:
    def stream(messages: list[pb.AgentMessage]) -> None:
        check(bidi(fleet.channels[FUZZ_AGENT], CONNECT, messages), messages)

    fuzz(fleet, 1, stream, agent_streams())


def test_fuzz_authorize_upload(fleet: Fleet) -> None:
    def authorize(request: pb.AuthorizeUploadRequest) -> None:
        # Allowed or not depends on the leases the stream fuzzing obtained: not checked.
        check(unary(fleet.channels[INGEST], AUTHORIZE_UPLOAD, request), request)

    fuzz(fleet, 0.5, authorize, upload_requests)


def test_fuzz_random_bytes(fleet: Fleet) -> None:
    def send(target: tuple[str, str], body: bytes) -> None:
        identity, path = target
        check(call(fleet.channels[identity], path, body), (path, body))

    fuzz(
        fleet,
        1,
        send,
        st.sampled_from([*RAW_TARGETS, (IC, OPERATOR + "CreateHold")]),
        st.one_of(st.binary(max_size=64), st.binary(min_size=100, max_size=2048)),
    )


def test_fuzz_protobuf_shaped_bytes(fleet: Fleet) -> None:
    def send(target: tuple[str, str], bodies: list[bytes]) -> None:
        identity, path = target
        channel = fleet.channels[identity]
        # Connect gets a whole stream of them.
        many = path == CONNECT
        outcome = bidi(channel, path, bodies) if many else call(channel, path, bodies[0])
        check(outcome, (path, bodies))

    fuzz(
        fleet,
        1,
        send,
        st.sampled_from(RAW_TARGETS),
        st.lists(wire_messages(), min_size=1, max_size=3),
    )
