"""The reference agent process, the simulator process, and their command line."""

from __future__ import annotations

import json
import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_stub import Backoff
from tests.agent_support import agent_cli
from tests.agent_support import enrolling_agent
from tests.conftest import BIN
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import free_port
from tests.conftest import terminate
from tests.conftest import wait_for


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


@pytest.fixture
def one_agent(server: ServerProcess, cli: Cli, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The reference agent as shipped: it enrols with a join token, then connects over mTLS."""
    labels = ["--label", "owner=alice", "--label", "region=eu-west"]
    proc = subprocess.Popen(
        enrolling_agent(server, cli, "alice-mbp", tmp_path / "alice-mbp", *labels),
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
    assert cli.agents()["alice-mbp"]["state"] == "VERIFIED_STOPPED"


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--agents", "0"], "positive whole number"),
        (["--agents", "3", "--fault", "melt=0.1"], "bad fault 'melt=0.1'"),
        (["--agents", "3", "--fault", "lie"], "bad fault 'lie'"),
        (["--agents", "3", "--fault", "lie=1.5"], "FRACTION in 0..1"),
        (["--agents", "3", "--fault", "lie=x"], "bad fault 'lie=x'"),
        (["--agents", "3", "--fault", "none=0.1"], "KIND one of ignore, lie, stubborn"),
        (["--agents", "3", "--fault", "lie=0.6,slow=0.3", "--fault", "sleep=0.2"], "add up to 1.1"),
        (["--agents", "3", "--capture-tick", "0"], "more than zero"),
        (["--agents", "3", "--fault-after", "-1"], "zero or more"),
        (["--agents", "60000"], "at most 50000 agents"),
        (["--agents", "3", "--ingest", "gateway"], "bad server address 'gateway'"),
        (["--agents", "3", "--fault", "silent-liar=2"], "KIND one of ignore, lie, stubborn"),
        (["--agents", "3", "--batch-events", "0"], "'0' must be a positive whole number"),
        (["--agents", "3", "--batch-events", "501"], "'501' must be at most 500 events"),
    ],
)
def test_simulator_rejects_bad_input(args: list[str], text: str) -> None:
    result = agent_cli("simulate", "--server", "x:1", *args)
    assert result.returncode == 2, result
    assert text in result.stderr and "Traceback" not in result.stderr


def test_simulator_fault_errors_are_one_line() -> None:
    result = agent_cli("simulate", "--server", "x:1", "--agents", "3", "--fault", "lie=0.9,lie=0.2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "killswitch-agent: error: fault fractions add up to 1.1; at most 1 (the whole fleet)"
    ]


def test_run_rejects_a_bad_label() -> None:
    result = agent_cli(
        "run", "--server", "x:1", "--agent-id", "a", "--label", "novalue", "--insecure"
    )
    assert result.returncode == 2 and "bad label" in result.stderr


def test_run_stops_with_one_line_on_an_unreadable_upload_sequence(tmp_path: Path) -> None:
    (tmp_path / "upload-sequence.json").write_text("{")
    result = agent_cli(
        "run",
        "--server",
        "127.0.0.1:1",
        "--agent-id",
        "a",
        "--state-dir",
        str(tmp_path),
        "--ingest",
        "127.0.0.1:2",
    )
    assert result.returncode == 1, result
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("killswitch-agent: error: cannot read ") and "upload-sequence" in line


def read_truth(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def test_simulator_writes_the_truth_file_and_triggers_faults_on_sigusr1(tmp_path: Path) -> None:
    truth = tmp_path / "truth.json"
    proc = subprocess.Popen(
        [
            str(BIN / "killswitch-agent"),
            "simulate",
            "--server",
            f"127.0.0.1:{free_port()}",  # nobody there: the agents never get a lease
            "--agents",
            "20",
            "--fault",
            "lie=0.1,sleep=0.25",
            "--fault-after",
            "3600",
            "--truth",
            str(truth),
            "--capture-tick",
            "0.05",
            "--insecure",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        first = wait_for(lambda: read_truth(truth), 20, "the truth file")
        assert first["trigger_at"] is None
        rows = first["agents"]
        assert [r["agent_id"] for r in rows] == [f"laptop-{i:05d}" for i in range(20)]
        faults = [r["fault"] for r in rows]
        assert (faults.count("lie"), faults.count("sleep"), faults.count("none")) == (2, 5, 13)
        assert rows[0].keys() == {
            "agent_id",
            "fault",
            "events_captured_total",
            "last_event_at",
            "events_without_lease",
            "capturing",
            "spans",
            "applied",
            "batches_sent",
            "events_sent",
            "batches_accepted",
            "events_accepted",
            "batches_refused",
            "last_accepted_event_at",
        }
        assert all(r["events_captured_total"] == 0 and not r["capturing"] for r in rows)

        proc.send_signal(signal.SIGUSR1)
        triggered = wait_for(
            lambda: (read_truth(truth) or {}).get("trigger_at"), 10, "the fault trigger"
        )
        assert isinstance(triggered, float)
    finally:
        truth.unlink()
        terminate(proc)
    assert proc.returncode == 0
    assert read_truth(truth)["trigger_at"] == triggered, "written again at exit"


def test_an_agent_keeps_retrying_whatever_broke_its_stream() -> None:
    """An agent that gives up on an unexpected error is an agent nobody can pause."""
    import asyncio

    import grpc

    from agent_stub import Agent
    from agent_stub import AgentConfig

    async def scenario() -> int:
        channel = grpc.aio.insecure_channel("127.0.0.1:1")
        agent = Agent(
            AgentConfig("a"),
            channel,
            backoff=Backoff(initial=0.01, maximum=0.01, rng=random.Random(1)),
        )
        attempts = 0

        async def broken_session() -> str:
            nonlocal attempts
            attempts += 1
            raise RuntimeError("stream broke in an unexpected way")

        agent._session = broken_session  # type: ignore[method-assign]
        runner = asyncio.create_task(agent.run())
        await asyncio.sleep(0.2)
        assert not runner.done(), "the agent gave up"
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await channel.close(grace=None)
        return attempts

    assert asyncio.run(scenario()) >= 3
