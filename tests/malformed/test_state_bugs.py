"""Bugs that changed state: values beyond int64 that once broke persistence, control
characters in a hold's reason. Each on its own fresh server, not the shared one."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from killswitch.v1 import killswitch_pb2 as pb

from tests.conftest import ServerProcess
from tests.conftest import agent_identity
from tests.malformed.calls import ALL
from tests.malformed.calls import IC
from tests.malformed.calls import INVALID
from tests.malformed.calls import OPERATOR
from tests.malformed.calls import Outcome
from tests.malformed.calls import StreamingAgent
from tests.malformed.calls import check
from tests.malformed.calls import secure_channel
from tests.malformed.calls import unary

# One worker runs every malformed-input module: they share the session's fleet
# (tests/malformed/conftest.py), which each worker would otherwise build for itself.
pytestmark = pytest.mark.xdist_group("malformed")


def _poison_with(
    server: ServerProcess, tmp_path: Path, message: Callable[[int], pb.AgentMessage]
) -> Outcome:
    """Connect a fresh agent, send ``message(epoch)``, then make the server write its state."""
    identity = agent_identity(server, "scratch", tmp_path)
    ic = secure_channel(server, server.identity(IC))
    agent = StreamingAgent(server, identity, "scratch", well_behaved=False)
    try:
        agent.send(message(agent.first_directive().epoch))
        time.sleep(0.5)
    finally:
        agent.close()
    with ic:
        expect = pb.ExpectAgentsRequest(agents=[pb.ExpectedAgent(agent_id="scratch")])
        return unary(ic, OPERATOR + "ExpectAgents", expect)  # already known: it only flushes


def test_nack_epoch_beyond_int64_cannot_break_persistence(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = start_server()
    outcome = _poison_with(
        server, tmp_path, lambda _: pb.AgentMessage(nack=pb.Nack(epoch=2**64 - 1, reason="x"))
    )
    check(outcome, "ExpectAgents after the nack")
    assert "agent_flush_failed" not in server.log_path.read_text(errors="replace")


def test_ack_counters_beyond_int64_cannot_break_persistence(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = start_server()
    outcome = _poison_with(
        server,
        tmp_path,
        lambda epoch: pb.AgentMessage(
            ack=pb.Ack(epoch=epoch, mode=pb.MODE_ALLOWED, purged_events=2**64 - 1)
        ),
    )
    check(outcome, "ExpectAgents after the ack")
    assert "agent_flush_failed" not in server.log_path.read_text(errors="replace")


@pytest.mark.parametrize(
    ("reason", "ticket"), [("leak \x1b[2J\x1b]0;owned\x07", ""), ("leak", "INC-1\x00\x1b[31m")]
)
def test_control_characters_in_reason_or_ticket_are_refused(
    start_server: Callable[..., ServerProcess], reason: str, ticket: str
) -> None:
    server = start_server()
    with secure_channel(server, server.identity(IC)) as ic:
        request = pb.CreateHoldRequest(scope=ALL, reason=reason, ticket=ticket)
        outcome = unary(ic, OPERATOR + "CreateHold", request)
    check(outcome, (reason, ticket))
    assert outcome.code is INVALID, outcome
