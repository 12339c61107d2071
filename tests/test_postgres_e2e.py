"""The control server on PostgreSQL: one real replica, a real database, real agents.

Each test gets its own database on the machine's PostgreSQL (127.0.0.1:5432). When it
is unreachable the tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulate
from tests.conftest import StartServer
from tests.conftest import connected_streams
from tests.conftest import replica_of
from tests.conftest import wait_capturing
from tests.conftest import wait_for
from tests.faults.relay import PG_ADDRESS
from tests.faults.relay import TcpProxy


def ready(server: ServerProcess) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/readyz", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def capturing(truth_path: Path) -> int:
    if not truth_path.exists():
        return -1
    rows: list[dict[str, Any]] = json.loads(truth_path.read_text())["agents"]
    return sum(bool(row["capturing"]) for row in rows)


def test_a_server_on_postgresql_pauses_survives_kill_9_and_verifies_its_audit(
    start_server: StartServer, simulate: Simulate, pg_dsn: str
) -> None:
    server = start_server("--database", pg_dsn)
    cli = Cli(server)
    simulate(server, 40)
    wait_capturing(cli, 40)
    hold = cli.pause("--all", "--reason", "leak", "--ticket", "INC-9", "--wait")
    server.kill9()
    server.start()
    assert [h["id"] for h in cli.json("holds")["holds"]] == [hold]
    wait_for(
        lambda: cli.json("status")["agents"]["by_state"].get("VERIFIED_STOPPED") == 40,
        60,
        "every agent verified stopped again after the restart",
    )
    # The audit chain lives in PostgreSQL and verifies from there, without the server.
    verified = cli.run("audit", "verify", "--database", pg_dsn)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    actions = [e["action"] for e in cli.json("audit")]
    assert "certs.issue" in actions and "hold.create" in actions


def test_losing_the_database_makes_the_replica_unready_and_agents_fail_closed(
    start_server: StartServer, simulate: Simulate, pg_dsn: str, tmp_path: Path
) -> None:
    proxy = TcpProxy(PG_ADDRESS)
    proxy.start()
    try:
        through_proxy = proxy.dsn(pg_dsn)
        server = start_server("--database", through_proxy)
        cli = Cli(server)
        truth = tmp_path / "truth.json"
        simulate(server, 20, "--truth", str(truth), "--fault-after", "3600")
        wait_capturing(cli, 20)
        wait_for(lambda: capturing(truth) == 20, 30, "every agent capturing")

        proxy.cut()
        # Leases are not renewed: every agent stops within one lease TTL (5 s here), plus
        # the store probe's interval (2 s) and the truth file's own lag.
        wait_for(lambda: capturing(truth) == 0, 5 + 2 + 5, "every agent stopped capturing")
        assert ready(server) == 503

        proxy.start()
        wait_for(lambda: ready(server) == 200, 30, "/readyz ready again")
        wait_for(lambda: capturing(truth) == 20, 30, "capture back once leases are granted")
    finally:
        proxy.cut()


def test_a_replica_told_to_stop_while_its_database_is_away_stops_promptly(
    start_server: StartServer, simulate: Simulate, pg_dsn: str
) -> None:
    """Restarting a replica is what an operator does during a database outage: neither
    its final flush (agents' rows it holds) nor its last audit checkpoint may wait out
    the pool's 10 s connection timeout, or for ever; what it could not write is named."""
    proxy = TcpProxy(PG_ADDRESS)
    proxy.start()
    try:
        server = start_server("--database", proxy.dsn(pg_dsn))
        cli = Cli(server)
        simulate(server, 5)
        wait_capturing(cli, 5)  # rows to write at the stop: their liveness figures
        proxy.cut()
        wait_for(lambda: ready(server) == 503, 30, "the replica noticing its database is gone")
        assert server.proc is not None
        started = time.monotonic()
        server.proc.terminate()
        server.proc.wait(timeout=30)
        took = time.monotonic() - started
    finally:
        proxy.cut()
    # 2 s of grace for the agents' streams, 3 s for the flush, 2 s for the checkpoint
    # (before: the flush waited out the pool's 10 s, then failed the rest of the stop).
    assert took < 9, f"the stop took {took:.1f} s"
    log = server.log()
    assert "no answer from the store within" in log
    assert "final_flush_failed" in log


# Agents find A at their next reconnect (each fresh channel starts at the next replica
# of its list): 16 s alone, under 21 s beside 3 busy workers (2026-12-06). It ran alone,
# after the parallel part, while agents drew a fresh shuffle each time (35-45 s alone,
# over 90 s beside 3 workers).
def test_a_replica_that_alone_loses_the_database_hands_its_agents_to_another(
    start_server: StartServer, simulate: Simulate, pg_dsn: str, tmp_path: Path
) -> None:
    """B's database link is cut, A's is not: B's agents must end up on A, capturing
    under A's leases, instead of sitting on B stopped until B's link comes back."""
    proxy = TcpProxy(PG_ADDRESS)
    proxy.start()
    replica_b: ServerProcess | None = None
    try:
        replica_a = start_server("--database", pg_dsn)
        through_proxy = proxy.dsn(pg_dsn)
        replica_b = replica_of(replica_a, tmp_path / "replica-b", ["--database", through_proxy])
        replica_b.start()
        truth = tmp_path / "truth.json"
        addresses = f"{replica_a.address},{replica_b.address}"
        simulate(replica_a, 20, "--server", addresses, "--truth", str(truth))
        wait_capturing(Cli(replica_a), 20)
        # A precondition, not a figure: 19 s beside 5 busy workers, over 30 s beside 7.
        wait_for(lambda: connected_streams(replica_b) > 0, 90, "some agents on B")
        wait_for(lambda: capturing(truth) == 20, 30, "every agent capturing")

        proxy.cut()
        wait_for(lambda: ready(replica_b) == 503, 15, "B not ready")
        # B sheds its streams once A takes it for dead (5 missed beats of 2 s), and
        # refuses them back; the agents reopen their channels until they land on A.
        wait_for(lambda: connected_streams(replica_a) == 20, 90, "every agent on A")
        assert connected_streams(replica_b) == 0
        wait_capturing(Cli(replica_a), 20, timeout=30)
        wait_for(lambda: capturing(truth) == 20, 30, "every agent capturing again")
        assert ready(replica_a) == 200
    finally:
        proxy.cut()
        if replica_b is not None:
            replica_b.stop()
