"""Limits gRPC enforces before our code runs: message and metadata size, calls in
flight per certificate, keepalive pings."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from killswitch.v1 import killswitch_pb2 as pb

from control.rpc.authz import DEFAULT_MAX_CALLS_PER_IDENTITY
from control.server import GRPC_SERVER_OPTIONS
from control.server import MAX_MESSAGE_BYTES
from control.server import MAX_METADATA_BYTES
from tests.conftest import wait_for
from tests.malformed.calls import AGENT_CHANNEL_OPTIONS
from tests.malformed.calls import ALL
from tests.malformed.calls import AUTHORIZE_UPLOAD
from tests.malformed.calls import CONNECT
from tests.malformed.calls import CROWD
from tests.malformed.calls import FUZZ_AGENT
from tests.malformed.calls import HEALTH_CHECK
from tests.malformed.calls import IC
from tests.malformed.calls import INGEST
from tests.malformed.calls import KA_AGENT
from tests.malformed.calls import KA_CONTROL
from tests.malformed.calls import OK
from tests.malformed.calls import OPERATOR
from tests.malformed.calls import TOO_BIG
from tests.malformed.calls import StreamingAgent
from tests.malformed.calls import bidi
from tests.malformed.calls import call
from tests.malformed.calls import check
from tests.malformed.calls import failed
from tests.malformed.calls import unary
from tests.malformed.fleet import Fleet
from tests.malformed.strategies import varint

# One worker runs every malformed-input module: they share the session's fleet
# (tests/malformed/conftest.py), which each worker would otherwise build for itself.
pytestmark = pytest.mark.xdist_group("malformed")


def test_messages_over_64_kib_are_refused(fleet: Fleet) -> None:
    big = pb.CreateHoldRequest(scope=ALL, reason="x" * (MAX_MESSAGE_BYTES + 6 * 1024))
    for identity, path, body in [
        (IC, OPERATOR + "CreateHold", big.SerializeToString()),
        (IC, OPERATOR + "ListHolds", b"\x98\x06" + varint(70_000) + b"\x00" * 70_000),
        (
            FUZZ_AGENT,
            CONNECT,
            pb.AgentMessage(
                hello=pb.Hello(agent_id=FUZZ_AGENT, agent_version="v" * 70_000)
            ).SerializeToString(),
        ),
    ]:
        outcome = call(fleet.channels[identity], path, body)
        check(outcome, path)
        assert outcome.code is TOO_BIG and "larger than max" in outcome.details, outcome
    fleet.assert_state_unchanged()


def test_metadata_over_the_hard_limit_is_refused(fleet: Fleet) -> None:
    """gRPC refuses metadata over 16 KiB (twice the 8 KiB soft limit) with RESOURCE_EXHAUSTED."""
    hard = 2 * MAX_METADATA_BYTES
    for metadata in [
        [("x-big", "a" * (hard + 1024))],
        [(f"x-many-{n}", "b" * 1000) for n in range(20)],
    ]:
        for identity, path in [(IC, OPERATOR + "ListHolds"), (INGEST, AUTHORIZE_UPLOAD)]:
            outcome = unary(fleet.channels[identity], path, b"", metadata=metadata)
            check(outcome, path)
            assert outcome.code is TOO_BIG and "metadata" in outcome.details, outcome
    fleet.assert_state_unchanged()


def test_metadata_just_over_8_kib_is_always_refused(fleet: Fleet) -> None:
    metadata = [("x-big", "a" * (MAX_METADATA_BYTES + 512))]
    outcomes = [unary(fleet.channels[IC], OPERATOR + "ListHolds", b"", metadata) for _ in range(20)]
    fleet.assert_serving()
    assert all(o.code is TOO_BIG for o in outcomes), Counter(o.code.name for o in outcomes)


def test_calls_in_flight_are_capped_per_certificate(fleet: Fleet) -> None:
    limit = DEFAULT_MAX_CALLS_PER_IDENTITY
    release = threading.Event()

    def silent() -> Iterator[bytes]:
        release.wait(30)
        yield from ()

    connect = fleet.channels[CROWD].stream_stream(CONNECT, None, None)
    held = [connect(silent(), timeout=30) for _ in range(limit)]
    try:
        for stream in held:  # headers come only once the call is admitted
            stream.initial_metadata()
        extra = bidi(fleet.channels[CROWD], CONNECT, [])
        assert extra.code is TOO_BIG, extra
        assert f"already has {limit} calls in flight" in extra.details, extra
        check(extra, "call over the cap")
        over_unary = unary(fleet.channels[CROWD], HEALTH_CHECK, b"")
        assert over_unary.code is TOO_BIG, over_unary
        # The cap comes before the role check: over it, a refusal costs no audit write.
        head = fleet.snapshot().audit_head
        over_denied = unary(fleet.channels[CROWD], OPERATOR + "CreateHold", b"")
        assert over_denied.code is TOO_BIG, over_denied
        assert not [e for e in fleet.audit_since(head) if e.actor == CROWD]
        # Everyone else is still served, the well-behaved agent keeps its stream.
        assert unary(fleet.channels[IC], OPERATOR + "ListHolds", b"").code is OK
        assert unary(fleet.channels[FUZZ_AGENT], HEALTH_CHECK, b"").code is OK
        fleet.assert_serving()
    finally:
        release.set()
        ends: list[object] = []
        for stream in held:
            try:
                ends.extend(stream)
            except grpc.RpcError as exc:
                ends.append(exc)
    assert all(s.code() is OK for s in held), [s.code() for s in held]
    # Released: the same certificate is served again.
    wait_for(
        lambda: unary(fleet.channels[CROWD], HEALTH_CHECK, b"").code is OK,
        5,
        "the certificate's calls to be released",
    )
    fleet.assert_state_unchanged()


def test_keepalive_of_agents_is_welcome_and_pinging_floods_are_not(fleet: Fleet) -> None:
    """An agent's 20 s keepalive never meets too_many_pings; a 1 s one does, within seconds.

    Proving the 20 s case on the wall clock would take three pings (a minute): instead
    the server's policy is shown to be live (the flood is cut off) and to allow the agent.
    """
    server_options = dict(GRPC_SERVER_OPTIONS)
    agent_options = dict(AGENT_CHANNEL_OPTIONS)
    assert server_options["grpc.keepalive_permit_without_calls"] == 1
    assert server_options["grpc.http2.max_pings_without_data"] == 0
    assert (
        server_options["grpc.http2.min_ping_interval_without_data_ms"]
        <= agent_options["grpc.keepalive_time_ms"] / 2
    )
    root = fleet.server.data_dir.parent
    flood_options = [
        ("grpc.keepalive_time_ms", 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    quiet = StreamingAgent(fleet.server, root / KA_AGENT, KA_AGENT, well_behaved=False)
    flood = StreamingAgent(
        fleet.server, root / KA_CONTROL, KA_CONTROL, options=flood_options, well_behaved=False
    )
    try:
        directive = quiet.first_directive()
        flood.first_directive()
        wait_for(lambda: flood.error is not None, 15, "the pinging flood to be cut off")
        assert flood.error is not None
        cut = failed(flood.error)
        assert (
            cut.code is grpc.StatusCode.UNAVAILABLE and "too many pings" in cut.details.lower()
        ), cut
        # The quiet agent, connected all along, still has a working stream.
        assert quiet.alive, quiet.describe()
        quiet.send(pb.AgentMessage(ack=pb.Ack(epoch=directive.epoch, mode=pb.MODE_ALLOWED)))
        quiet.send(pb.AgentMessage(lease_request=pb.LeaseRequest(request_id=1)))
        wait_for(lambda: fleet.agent(KA_AGENT).state == "CAPTURING", 5, "the quiet agent's ack")
        assert fleet.agent(KA_AGENT).connected
    finally:
        quiet.close()
        flood.close()
    fleet.assert_state_unchanged()
