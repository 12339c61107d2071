"""Structured logs: JSON lines a log pipeline can index, with the ids an SRE searches by."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any

from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulator
from tests.conftest import wait_capturing
from tests.conftest import wait_for

# Events about one agent: each must say which.
AGENT_EVENTS = {
    "agent_enrolled",
    "agent_nacked",
    "violation_detected",
    "upload_refused",
    "agent_stream_closed",
    "violation_acknowledged",
}
# Operator actions on holds: each must say who and which hold.
HOLD_EVENTS = {"hold_created", "hold_lifted", "resume_request", "resume_approve"}


def server_lines(server: ServerProcess) -> list[dict[str, Any]]:
    lines = server.log_path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_agent_and_operator_lines_carry_their_ids(
    start_server: Callable[..., ServerProcess], simulate: Callable[..., Simulator]
) -> None:
    server = start_server("--ack-deadline", "5")
    cli = Cli(server)
    sim = simulate(
        server, 20, "--fault", "lie=0.1,stubborn=0.1", "--fault-after", "3600",
        "--capture-tick", "0.2", "--upload-every", "1",
    )  # fmt: skip
    wait_capturing(cli, 20)
    sim.proc.send_signal(signal.SIGUSR1)
    hold = cli.pause("--all", "--reason", "log check")
    wait_for(lambda: cli.agents("--state", "VIOLATION"), 30, "a violation")
    wait_for(lambda: cli.agents("--state", "FAILED"), 30, "a nack")
    cli.resume(hold)

    lines = server_lines(server)
    assert lines and all({"event", "level", "timestamp"} <= line.keys() for line in lines)
    seen = {line["event"] for line in lines}
    assert {"agent_enrolled", "violation_detected", "agent_nacked", "hold_created"} <= seen
    assert {"hold_lifted", "resume_request", "resume_approve"} <= seen
    for line in lines:
        if line["event"] in AGENT_EVENTS:
            assert line.get("agent_id"), line
        if line["event"] in HOLD_EVENTS:
            assert line.get("operator") and line.get("hold_id") == hold, line


def test_console_format_is_for_people(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--log-format", "console")
    Cli(server).pause("--all", "--reason", "console check")
    text = server.log_path.read_text()
    assert "hold_created" in text
    assert not any(line.startswith("{") for line in text.splitlines() if "hold_created" in line)
