"""Three control-server replicas on one PostgreSQL, one fleet spread over them.

Real subprocesses on loopback ports sharing one CA and one database, enrolled agents
given every replica's address, `kill -9` of a replica mid-pause, concurrent pause and
resume on two replicas, and a history check over every ack the replicas logged. Every
check of the fleet's state asks every replica, which must all give the same answer.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulator
from tests.conftest import connected_streams
from tests.conftest import replica_of
from tests.conftest import wait_for
from tests.dashboard_support import Http
from tests.faults.harness import check_history
from tests.faults.harness import db_holds

AGENTS = 60


@dataclass
class Cluster:
    replicas: list[ServerProcess]
    dsn: str

    def cli(self, index: int, identity: str = "ic-1") -> Cli:
        return Cli(self.replicas[index], identity)

    def live(self) -> list[ServerProcess]:
        return [r for r in self.replicas if r.proc is not None and r.proc.poll() is None]

    def all_in(self, state: str) -> bool:
        """Whether every live replica shows every agent connected and in ``state``."""
        for replica in self.live():
            rows = Cli(replica).agents()
            if len(rows) != AGENTS or {(r["state"], r["connected"]) for r in rows.values()} != {
                (state, True)
            }:
                return False
        return True

    def streams(self) -> dict[str, int]:
        """Live agent streams per live replica, from its /metrics."""
        return {replica.address: connected_streams(replica) for replica in self.live()}


@pytest.fixture
def cluster(
    start_server: Callable[..., ServerProcess], pg_dsn: str, tmp_path: Path
) -> Iterator[Cluster]:
    # Debug logs carry every ack, for the history check.
    extra = ["--database", pg_dsn, "--log-level", "debug"]
    first = start_server(*extra)
    replicas = [first]
    for name in ("replica-b", "replica-c"):
        replica = replica_of(first, tmp_path / name, extra)
        replica.start()
        replicas.append(replica)
    try:
        yield Cluster(replicas, pg_dsn)
    finally:
        for replica in replicas[1:]:
            replica.stop()


@pytest.fixture
def fleet(cluster: Cluster, simulate: Callable[..., Simulator]) -> Simulator:
    addresses = ",".join(r.address for r in cluster.replicas)
    sim = simulate(cluster.replicas[0], AGENTS, "--server", addresses)
    wait_for(lambda: cluster.all_in("CAPTURING"), 60, "every agent capturing, on every replica")
    wait_for(lambda: sum(cluster.streams().values()) == AGENTS, 30, "one stream per agent")
    return sim


def test_a_pause_on_one_replica_reaches_every_replica_and_survives_losing_one(
    cluster: Cluster, fleet: Simulator
) -> None:
    spread = cluster.streams()
    assert all(spread.values()), spread

    hold = cluster.cli(0).pause("--all", "--reason", "leak", "--ticket", "INC-1")
    cluster.replicas[1].kill9()  # mid-pause: its agents fail over to the others
    wait_for(lambda: cluster.all_in("VERIFIED_STOPPED"), 60, "every agent verified stopped")
    assert sum(cluster.streams().values()) == AGENTS

    cluster.replicas[1].start()
    # The restarted replica serves nobody yet, and answers for the whole fleet.
    wait_for(lambda: cluster.all_in("VERIFIED_STOPPED"), 30, "the same view on the restarted B")
    restarted = cluster.cli(1)
    assert [h["id"] for h in restarted.json("holds")["holds"]] == [hold]
    epochs = {Cli(r).json("status")["epoch"] for r in cluster.replicas}
    assert len(epochs) == 1, epochs
    verified = restarted.run("audit", "verify", "--database", cluster.dsn)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    dashboard_on_any_replica(cluster)


def dashboard_on_any_replica(cluster: Cluster) -> None:
    """Behind a load balancer each request may reach another replica: a link issued by
    A opens its confirmation page on B, is confirmed on C, and the session shows the
    whole fleet there."""
    link = urlsplit(cluster.cli(0, "sre-1").ok("dashboard").strip())
    b, c = (Http(r.http_port) for r in cluster.replicas[1:])
    page, form = b.open_link(f"http://127.0.0.1:{b.port}{link.path}?{link.query}")
    assert page.status == 200 and set(form) == {"token", "csrf"}, page
    c.login_cookie = b.login_cookie
    assert c.confirm(form).status == 303
    assert c.json("/api/summary")["summary"]["total"] == AGENTS


def test_concurrent_pause_and_resume_on_two_replicas_always_end_paused(
    cluster: Cluster, fleet: Simulator
) -> None:
    """A resume lifts an older hold; a pause racing it adds a newer one, which must win."""
    ic_a, ic_b = cluster.cli(0), cluster.cli(1)
    approver_b = cluster.cli(1, "approver-1")
    older = ic_a.pause("--all", "--reason", "round 0")
    for round_number in range(1, 9):
        request = ic_b.ok("resume", "--hold", older, "--reason", "clear", "-q").strip()
        reason = f"round {round_number}"
        newer = race(
            functools.partial(ic_a.pause, "--all", "--reason", reason),
            functools.partial(approver_b.ok, "approve", request),
        )
        for replica in cluster.replicas:
            wait_for(
                functools.partial(only_hold, replica, newer),
                15,
                f"{reason}: only the newer hold on {replica.address}",
            )
        older = newer
    holds = db_holds(cluster.dsn)
    epochs = sorted([h["created"] for h in holds] + [h["lifted"] for h in holds if h["lifted"]])
    assert len(epochs) == len(set(epochs)), "every hold change has its own epoch"
    # A false VIOLATION here was a replica announcing an epoch without the holds of
    # the epochs before it (HoldCommits._apply_commit).
    wait_for(lambda: cluster.all_in("VERIFIED_STOPPED"), 60, "every agent verified stopped")
    check_history_of(cluster)


def only_hold(replica: ServerProcess, hold_id: str) -> bool:
    return [h["id"] for h in Cli(replica).json("holds")["holds"]] == [hold_id]


def race(first: Callable[[], str], second: Callable[[], str]) -> str:
    """Run both at once (two operators, two replicas); return what ``first`` returned."""
    results: list[str] = []
    thread = threading.Thread(target=lambda: results.append(second()))
    thread.start()
    answer = first()
    thread.join()
    assert results, "the second operator's command failed"
    return answer


def check_history_of(cluster: Cluster) -> None:
    """No ack in a mode, and no lease at an epoch, that the holds then contradict."""
    acks, grants = check_history(cluster.replicas, db_holds(cluster.dsn))
    assert acks >= AGENTS * 2
    assert grants >= AGENTS, "every agent was granted a lease at least once"
