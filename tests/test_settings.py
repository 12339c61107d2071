"""Every default is defined once, and what must agree across processes does.

The server's flags default to ``ServerSettings``' fields; the agent (``agent_stub``, which
may not import ``control``) keeps its own copy of the protocol timings, held equal here,
as tests/test_wire.py holds the wire rules.
"""

from __future__ import annotations

from pathlib import Path

import agent_stub.config
from agent_stub.cli import build_parser as agent_parser
from control.cli.app import build_parser
from control.cli.options import DEFAULT_SERVER
from control.cli.serve import settings_from_args
from control.domain import CompliancePolicy
from control.domain import timings as server_timings
from control.domain.readiness import ReadinessPolicy
from control.settings import DEFAULTS
from control.settings import ServerSettings
from simulator.cli import add_simulate_command


def test_the_agent_assumes_the_servers_default_timings_until_told() -> None:
    assert agent_stub.config.DEFAULT_LEASE_TTL_SECONDS == server_timings.DEFAULT_LEASE_TTL_SECONDS
    assert agent_stub.config.DEFAULT_HEARTBEAT_SECONDS == server_timings.DEFAULT_HEARTBEAT_SECONDS
    # The agent's proof report must land past the server's proof window, or it proves nothing.
    assert (
        agent_stub.config.PROOF_REPORT_DELAY_SECONDS > server_timings.DEFAULT_PROOF_WINDOW_SECONDS
    )


def test_the_domain_policies_default_to_the_same_timings_as_the_server() -> None:
    policy = CompliancePolicy()
    assert policy.ack_deadline == DEFAULTS.ack_deadline
    assert policy.heartbeat_interval == DEFAULTS.heartbeat_interval
    assert ReadinessPolicy().lease_ttl == DEFAULTS.lease_ttl


def test_serve_without_flags_is_the_default_settings(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path)])
    assert settings_from_args(args) == ServerSettings(data_dir=tmp_path)


def test_clients_look_for_the_server_where_it_listens_by_default() -> None:
    assert DEFAULTS.grpc_address == DEFAULT_SERVER


def test_simulated_agents_are_paced_as_real_ones_by_default() -> None:
    args = agent_parser(add_simulate_command).parse_args(
        ["simulate", "--server", "127.0.0.1:1", "--agents", "1", "--insecure"]
    )
    tuning = agent_stub.config.Tuning()
    assert (args.capture_tick, args.upload_every) == (tuning.capture_tick, tuning.upload_every)
