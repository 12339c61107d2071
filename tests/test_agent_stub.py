"""The reference agent: backoff, directive handling, and one real agent process."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator

import grpc
import pytest
from killswitch.v1 import killswitch_pb2 as pb

from agent_stub import Agent, AgentConfig, Backoff, Behaviour
from agent_stub.simulate import fleet_configs
from tests.conftest import BIN, Cli, ServerProcess, terminate, wait_for


def test_backoff_grows_with_jitter_caps_and_resets() -> None:
    backoff = Backoff(initial=1.0, multiplier=1.6, jitter=0.2, maximum=5.0, rng=random.Random(3))
    delays = [backoff.next_delay() for _ in range(8)]
    assert 0.8 <= delays[0] <= 1.2
    assert 1.28 <= delays[1] <= 1.92
    assert all(d <= 6.0 for d in delays) and delays[-1] >= 4.0
    backoff.reset()
    assert backoff.next_delay() <= 1.2
    # Jitter: a fleet does not retry in lock-step.
    first = {round(Backoff(rng=random.Random(s)).next_delay(), 6) for s in range(50)}
    assert len(first) == 50


def directive(mode: pb.Mode.ValueType, epoch: int = 4) -> pb.Directive:
    return pb.Directive(epoch=epoch, mode=mode, reason="r", heartbeat_interval_seconds=5)


def make_agent(behaviour: Behaviour = Behaviour.OBEDIENT) -> Agent:
    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    return Agent(AgentConfig("a", behaviour=behaviour), channel)


def test_agent_starts_with_capture_off_and_obeys_directives() -> None:
    agent = make_agent()
    assert not agent.engine.capturing, "unknown state means off"
    reply = agent.apply(directive(pb.MODE_ALLOWED, 3))
    assert reply is not None and reply.ack.epoch == 3 and agent.engine.capturing
    reply = agent.apply(directive(pb.MODE_PAUSED, 4))
    assert reply is not None and reply.ack.mode == pb.MODE_PAUSED
    assert {c.state for c in reply.ack.channels} == {pb.CHANNEL_STATE_STOPPED}
    assert not agent.engine.capturing and agent.applied_epoch == 4


def test_unknown_mode_stops_capture_and_nacks() -> None:
    agent = make_agent()
    agent.apply(directive(pb.MODE_ALLOWED, 3))
    reply = agent.apply(directive(pb.MODE_UNSPECIFIED, 5))
    assert reply is not None and reply.WhichOneof("body") == "nack"
    assert not agent.engine.capturing


def test_faulty_behaviours() -> None:
    stuck = make_agent(Behaviour.NACK)
    reply = stuck.apply(directive(pb.MODE_PAUSED))
    assert reply is not None and "screen" in reply.nack.reason
    assert make_agent(Behaviour.SILENT).apply(directive(pb.MODE_PAUSED)) is None


def test_simulated_fleet_is_deterministic_per_seed() -> None:
    a = fleet_configs(50, seed=7, faults={Behaviour.NACK: 2, Behaviour.SILENT: 3})
    b = fleet_configs(50, seed=7, faults={Behaviour.NACK: 2, Behaviour.SILENT: 3})
    assert [(c.agent_id, c.labels, c.behaviour) for c in a] == [
        (c.agent_id, c.labels, c.behaviour) for c in b
    ]
    assert sum(c.behaviour is Behaviour.NACK for c in a) == 2
    assert sum(c.behaviour is Behaviour.SILENT for c in a) == 3
    assert {"region", "org", "os", "owner"} == set(a[0].labels)


@pytest.fixture
def one_agent(server: ServerProcess) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [
            str(BIN / "killswitch-agent"),
            "run",
            "--server",
            server.address,
            "--agent-id",
            "alice-mbp",
            "--label",
            "owner=alice",
            "--label",
            "region=eu-west",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield proc
    terminate(proc)


def test_one_reference_agent_paused_by_id(cli: Cli, one_agent: subprocess.Popen[bytes]) -> None:
    wait_for(
        lambda: cli.agents().get("alice-mbp", {}).get("state") == "CAPTURING",
        20,
        "alice-mbp capturing",
    )
    assert cli.agents()["alice-mbp"]["labels"] == {"owner": "alice", "region": "eu-west"}
    out = cli.ok("pause", "--agent", "alice-mbp", "--reason", "employee request", "--wait")
    assert "all 1 agents in scope stopped" in out
    assert cli.agents()["alice-mbp"]["state"] == "STOP_REPORTED"


def test_agent_cli_rejects_bad_input() -> None:
    for args, text in [
        (["simulate", "--server", "x:1", "--agents", "0"], "positive whole number"),
        (["simulate", "--server", "x:1", "--agents", "3", "--fault", "melt=1"], "bad fault"),
        (["simulate", "--server", "x:1", "--agents", "3", "--fault", "nack=5"], "more faulty"),
        (["run", "--server", "x:1", "--agent-id", "a", "--label", "novalue"], "bad label"),
    ]:
        result = subprocess.run(
            [str(BIN / "killswitch-agent"), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 2, result
        assert text in result.stderr and "Traceback" not in result.stderr
