"""Lying laptops against two replicas on PostgreSQL: VIOLATION everywhere, for good.

Real servers and the simulator's ``lie`` fault (acks the pause, captures on); the
ground truth (``--truth``) says who lied and what everyone captured. Every liar must
end in VIOLATION on every replica, and stay there after the replica serving it is
killed with ``kill -9`` and after that replica comes back.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulator
from tests.conftest import replica_of
from tests.conftest import wait_for
from tests.faults.checker import Pause
from tests.faults.checker import check
from tests.faults.checker import read_truth

AGENTS = 12
LEASE_TTL = 5.0  # conftest's FAST_TIMINGS


@pytest.fixture
def replicas(
    start_server: Callable[..., ServerProcess], pg_dsn: str, tmp_path: Path
) -> Iterator[list[ServerProcess]]:
    extra = ["--database", pg_dsn]
    first = start_server(*extra)
    second = replica_of(first, tmp_path / "replica-b", extra)
    second.start()
    try:
        yield [first, second]
    finally:
        second.stop()


def serving(dsn: str, agent_ids: set[str], replicas: list[ServerProcess]) -> ServerProcess:
    """The replica that wrote the rows of most of ``agent_ids`` (replica ids carry the pid)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT agent_id, written_by FROM agents").fetchall()
    writers = [by for agent_id, by in rows if agent_id in agent_ids]

    def served(replica: ServerProcess) -> int:
        assert replica.proc is not None
        return sum(f"-{replica.proc.pid}-" in by for by in writers)

    return max(replicas, key=served)


def test_every_liar_ends_in_violation_on_every_replica_and_stays_there(
    replicas: list[ServerProcess],
    simulate: Callable[..., Simulator],
    pg_dsn: str,
    tmp_path: Path,
) -> None:
    truth_path = tmp_path / "truth.json"
    sim = simulate(
        replicas[0], AGENTS,
        "--server", ",".join(r.address for r in replicas),
        "--fault", "lie=0.25", "--fault-after", "3600", "--truth", str(truth_path),
        "--capture-tick", "0.2", "--upload-every", "1", "--seed", "13",
    )  # fmt: skip

    def states(replica: ServerProcess) -> dict[str, str]:
        return {a: row["state"] for a, row in Cli(replica).agents().items()}

    def everywhere(expected: Callable[[str], str]) -> bool:
        live = [r for r in replicas if r.proc is not None and r.proc.poll() is None]
        return all(
            len(s) == AGENTS and all(state == expected(a) for a, state in s.items())
            for s in map(states, live)
        )

    wait_for(lambda: everywhere(lambda a: "CAPTURING"), 60, "the fleet capturing")
    # Taken before the call: the commit comes later, so the checker's bound is stricter.
    committed_at = time.time()
    Cli(replicas[1]).pause("--all", "--reason", "leak", "--ticket", "INC-13")
    sim.proc.send_signal(signal.SIGUSR1)  # the liars start capturing again, in secret
    liars = {
        row["agent_id"]
        for row in read_truth(truth_path, newer_than=committed_at)["agents"]
        if row["fault"] == "lie"
    }
    assert len(liars) == AGENTS // 4, liars

    def verdict_of(agent_id: str) -> str:
        return "VIOLATION" if agent_id in liars else "VERIFIED_STOPPED"

    wait_for(lambda: everywhere(verdict_of), 60, "liars in VIOLATION, the rest stopped")

    victim = serving(pg_dsn, liars, replicas)
    victim.kill9()  # its liars fail over to the other replica, and lie on
    survivor = next(r for r in replicas if r is not victim)
    wait_for(
        lambda: all(s["connected"] for s in Cli(survivor).agents().values()),
        60,
        "every agent reconnected to the survivor",
    )
    time.sleep(3)  # a few heartbeats and uploads on the new streams
    assert everywhere(verdict_of), states(survivor)
    victim.start()
    wait_for(lambda: everywhere(verdict_of), 30, "the same verdicts on the restarted replica")

    truth = read_truth(truth_path, newer_than=time.time())
    verdict = check(
        "lie, kill -9 of the serving replica",
        truth,
        [Pause(committed_at)],
        lease_ttl=LEASE_TTL,
        server_states=[Cli(r).agents() for r in replicas],
    )
    verdict.assert_holds()
