"""Hypothesis against the real server: every answer clean, nothing changed, all still up."""

from __future__ import annotations

import re
from collections import Counter

import grpc
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


def examples(weight: float) -> int:
    """A property's examples: each is a real gRPC call, so a quarter of the profile's
    (tests/conftest.py), by weight: 20-25 by default, 125-250 with HYPOTHESIS_PROFILE=large."""
    return max(20, round(settings().max_examples * weight / 4))


def test_fuzz_operator_mutations_are_refused_and_audited(fleet: Fleet) -> None:
    start = fleet.snapshot().audit_head
    refused: Counter[str] = Counter()

    @settings(FUZZ, max_examples=examples(1))
    @given(st.data())
    def run(data: st.DataObject) -> None:
        identity, path, message = data.draw(operator_mutations(fleet))
        outcome = unary(fleet.channels[identity], path, message)
        check(outcome, (identity, path, message))
        assert outcome.code is not grpc.StatusCode.OK, f"accepted: {path} {message!r:.300}"
        if outcome.code is not grpc.StatusCode.RESOURCE_EXHAUSTED:  # not refused by gRPC itself
            refused[f"{identity} {path.rsplit('/', 1)[1]}"] += 1
        fleet.tick()

    run()
    fleet.assert_state_unchanged()
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
    @settings(FUZZ, max_examples=examples(0.75))
    @given(st.data())
    def run(data: st.DataObject) -> None:
        identity, path, message = data.draw(operator_reads(fleet))
        check(call(fleet.channels[identity], path, message), (path, message))
        fleet.tick()

    run()
    fleet.assert_state_unchanged()


def test_fuzz_self_service(fleet: Fleet) -> None:
    @settings(FUZZ, max_examples=examples(0.5))
    @given(self_service_calls())
    def run(request: OperatorCall) -> None:
        identity, path, message = request
        outcome = unary(fleet.channels[identity], path, message)
        check(outcome, request)
        if not path.endswith("/ListMyLaptops"):
            assert outcome.code is not grpc.StatusCode.OK, f"accepted: {request!r:.300}"
        fleet.tick()

    run()
    fleet.assert_state_unchanged()


def test_fuzz_agent_streams(fleet: Fleet) -> None:
    @settings(FUZZ, max_examples=examples(1))
    @given(agent_streams())
    def run(messages: list[pb.AgentMessage]) -> None:
        outcome = bidi(fleet.channels[FUZZ_AGENT], CONNECT, messages)
        check(outcome, messages)
        fleet.tick()

    run()
    fleet.assert_state_unchanged()


def test_fuzz_authorize_upload(fleet: Fleet) -> None:
    @settings(FUZZ, max_examples=examples(0.5))
    @given(upload_requests)
    def run(request: pb.AuthorizeUploadRequest) -> None:
        outcome = unary(fleet.channels[INGEST], AUTHORIZE_UPLOAD, request)
        # Allowed or not depends on the leases the stream fuzzing obtained: not checked.
        check(outcome, request)
        fleet.tick()

    run()
    fleet.assert_state_unchanged()


def test_fuzz_random_bytes(fleet: Fleet) -> None:
    @settings(FUZZ, max_examples=examples(1))
    @given(
        st.sampled_from([*RAW_TARGETS, (IC, OPERATOR + "CreateHold")]),
        st.one_of(st.binary(max_size=64), st.binary(min_size=100, max_size=2048)),
    )
    def run(target: tuple[str, str], body: bytes) -> None:
        identity, path = target
        check(call(fleet.channels[identity], path, body), (path, body))
        fleet.tick()

    run()
    fleet.assert_state_unchanged()


def test_fuzz_protobuf_shaped_bytes(fleet: Fleet) -> None:
    @settings(FUZZ, max_examples=examples(1))
    @given(st.sampled_from(RAW_TARGETS), st.lists(wire_messages(), min_size=1, max_size=3))
    def run(target: tuple[str, str], bodies: list[bytes]) -> None:
        identity, path = target
        channel = fleet.channels[identity]
        # Connect gets a whole stream of them.
        many = path == CONNECT
        outcome = bidi(channel, path, bodies) if many else call(channel, path, bodies[0])
        check(outcome, (path, bodies))
        fleet.tick()

    run()
    fleet.assert_state_unchanged()
