"""The agent's copy of the wire rules matches the server's.

``agent_stub`` ships without ``control``, so it repeats the few wire rules both sides
must agree on (``agent_stub/wire_rules.py``); this is what keeps the copy honest.
"""

from __future__ import annotations

import pytest

import agent_stub.wire_rules
import control.wire


def test_the_insecure_identity_header_is_the_same_on_both_sides() -> None:
    assert agent_stub.wire_rules.INSECURE_IDENTITY_HEADER == control.wire.INSECURE_IDENTITY_HEADER


@pytest.mark.parametrize("port", [1, 50051, 65534])
def test_agents_look_for_enrolment_where_the_server_listens(port: int) -> None:
    assert agent_stub.wire_rules.enrolment_port(port) == control.wire.enrolment_port(port)
