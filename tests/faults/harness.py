"""Real replicas, a real simulator with ``--truth``, and the checker, for fault tests.

Every fault test follows one shape: a fleet capturing, a fault, a pause committed
somewhere, time for the promise to play out, then the ground truth judged by
``tests.faults.checker`` and the verdict table printed (it goes into closing notes).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import FAST_TIMINGS
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulator
from tests.conftest import replica_of
from tests.conftest import wait_for
from tests.faults.checker import Pause
from tests.faults.checker import Verdict
from tests.faults.checker import check
from tests.faults.checker import read_truth

# The fast timings every test server runs with: the lease TTL the checker allows.
LEASE_TTL = float(FAST_TIMINGS[FAST_TIMINGS.index("--lease-ttl") + 1])


@dataclass
class Fleet:
    """Replicas sharing one CA (and, on PostgreSQL, one database), and one simulator."""

    replicas: list[ServerProcess]
    truth_path: Path
    simulator: Simulator | None = None
    pauses: list[Pause] = field(default_factory=list)

    @property
    def addresses(self) -> str:
        return ",".join(r.address for r in self.replicas)

    def live(self) -> list[ServerProcess]:
        return [r for r in self.replicas if r.proc is not None and r.proc.poll() is None]

    def cli(self, replica: ServerProcess | None = None, identity: str = "ic-1") -> Cli:
        return Cli(replica or self.live()[0], identity)

    def views(self) -> list[dict[str, dict[str, Any]]]:
        """``killswitch agents --json`` from every live replica."""
        return [Cli(replica).agents() for replica in self.live()]

    def all_in(self, count: int, *states: str) -> bool:
        """Every live replica shows ``count`` agents, every one in one of ``states``."""
        for view in self.views():
            if len(view) != count or any(row["state"] not in states for row in view.values()):
                return False
        return True

    def capturing(self) -> int:
        if not self.truth_path.exists():
            return -1
        rows: list[dict[str, Any]] = json.loads(self.truth_path.read_text())["agents"]
        return sum(bool(row["capturing"]) for row in rows)

    def pause(
        self, replica: ServerProcess, *args: str, covers: frozenset[str] | None = None
    ) -> str:
        """Commit a pause on ``replica``; the checker learns its commit time from it, and
        whom it covers (``covers``; None for the whole fleet)."""
        cli = Cli(replica)
        hold_id = cli.pause(*args)
        holds = {h["id"]: h for h in cli.json("holds")["holds"]}
        committed = datetime.fromisoformat(holds[hold_id]["created_at"]).timestamp()
        self.pauses.append(Pause(committed, covers))
        return hold_id

    def verdict(self, fault: str, *, settle: float = 0.0, with_views: bool = True) -> Verdict:
        """Judge the truth written after now (+ ``settle``) against every pause, and the
        live replicas' verdicts against the truth (``with_views``)."""
        truth = read_truth(self.truth_path, newer_than=time.time() + settle, timeout=settle + 10)
        views = self.views() if with_views else []
        return check(fault, truth, self.pauses, lease_ttl=LEASE_TTL, server_states=views)


@pytest.fixture
def fleet_of(
    start_server: Callable[..., ServerProcess],
    simulate: Callable[..., Simulator],
    tmp_path: Path,
) -> Iterator[Callable[..., Fleet]]:
    """``fleet_of(agents, replicas=1, dsns=[...], server_args=[...], sim_args=[...])``:
    replicas (each on its own DSN, e.g. through a relay) and a simulator on all of them,
    every agent capturing before it returns."""
    started: list[ServerProcess] = []

    def make(
        agents: int,
        *,
        dsns: Sequence[str] = (),
        server_args: Sequence[str] = (),
        sim_args: Sequence[str] = (),
    ) -> Fleet:
        replicas = []
        for index, dsn in enumerate(dsns or [""]):
            extra = [*server_args, "--log-level", "debug"]
            if dsn:
                extra += ["--database", dsn]
            if index == 0:
                replicas.append(start_server(*extra))
                continue
            replica = replica_of(replicas[0], tmp_path / f"replica-{index}", extra)
            replica.start()
            started.append(replica)
            replicas.append(replica)
        fleet = Fleet(replicas, tmp_path / "truth.json")
        fleet.simulator = simulate(
            replicas[0],
            agents,
            "--server",
            fleet.addresses,
            "--truth",
            str(fleet.truth_path),
            "--capture-tick",
            "0.2",
            *sim_args,
        )
        wait_for(lambda: fleet.capturing() == agents, 60, "every agent capturing")
        return fleet

    try:
        yield make
    finally:
        for replica in started:
            replica.stop()


def db_holds(dsn: str) -> list[dict[str, Any]]:
    """Every hold in the database, with the epochs it was created and lifted at."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id, created_epoch, lifted_epoch, lifted_at IS NULL FROM holds"
        ).fetchall()
    # An active hold's lifted_epoch is 0, not NULL.
    return [{"id": r[0], "created": r[1], "lifted": None if r[3] else r[2]} for r in rows]


def check_history(
    replicas: Sequence[ServerProcess], holds: list[dict[str, Any]]
) -> tuple[int, int]:
    """Every decision the replicas logged (debug level) against the holds in force at its
    epoch, as etcd's robustness tests do: no ack in a mode those holds contradict, and
    no lease granted at an epoch where a hold was in force (every hold in these tests
    covers the whole fleet). Returns the acks and the grants checked."""

    def paused_at(epoch: int) -> bool:
        return any(
            h["created"] <= epoch and (h["lifted"] is None or epoch < h["lifted"]) for h in holds
        )

    acks = grants = 0
    for replica in replicas:
        for line in replica.log_path.read_text(errors="replace").splitlines():
            if '"agent_acked"' in line:
                event = json.loads(line)
                expected = "PAUSED" if paused_at(event["epoch"]) else "ALLOWED"
                assert event["mode"] == expected, (replica.address, event, holds)
                acks += 1
            elif '"lease_granted"' in line:
                event = json.loads(line)
                assert not paused_at(event["epoch"]), (replica.address, event, holds)
                grants += 1
    return acks, grants
