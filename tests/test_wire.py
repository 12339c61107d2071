"""The agent's copy of the wire rules matches the server's.

``agent_stub`` ships without ``control``, so it repeats the few wire rules both sides
must agree on (``agent_stub/wire_rules.py``); this is what keeps the copy honest.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import agent_stub.wire_rules
import control.wire
from control.errors import InvalidInput
from control.rpc.convert import since_ack_from_pb
from control.rpc.convert import timestamp


def test_the_insecure_identity_header_is_the_same_on_both_sides() -> None:
    assert agent_stub.wire_rules.INSECURE_IDENTITY_HEADER == control.wire.INSECURE_IDENTITY_HEADER


@pytest.mark.parametrize("port", [1, 50051, 65534])
def test_agents_look_for_enrolment_where_the_server_listens(port: int) -> None:
    assert agent_stub.wire_rules.enrolment_port(port) == control.wire.enrolment_port(port)


@given(st.one_of(st.none(), st.floats(min_value=-1e10, max_value=1e11, allow_nan=False)))
def test_a_server_time_reads_in_json_as_it_does_once_it_has_travelled(
    seconds: float | None,
) -> None:
    """The dashboard shows the plane's times; the CLI shows them off the wire: the same."""
    travelled = timestamp(seconds)
    expected = None if travelled is None else control.wire.iso(travelled)
    assert control.wire.iso_of_seconds(seconds) == expected


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_a_count_of_seconds_since_an_ack_that_no_clock_could_show_is_refused(
    value: float,
) -> None:
    with pytest.raises(InvalidInput, match="seconds_since_ack out of range"):
        since_ack_from_pb(value)


def test_a_heartbeat_without_a_count_since_its_ack_claims_nothing() -> None:
    assert since_ack_from_pb(0.0) is None
    assert since_ack_from_pb(2.25) == 2.25
