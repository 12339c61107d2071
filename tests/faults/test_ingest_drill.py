"""The drill of issue 14: every fault kind against server + ingest gateway + simulator.

The judge is where data lands and what the agents really did: the gateway's sink (read
through its checksummed records) and the simulator's ground truth, never the server's
own view alone. Required: every silent liar in VIOLATION within one upload interval
+ 2 s of its first upload after the pause; no honest agent flagged; no event in the sink
captured after the pause (+ one lease TTL for agents that honour their lease).
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections import defaultdict
from collections.abc import Callable
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from killswitch.v1 import killswitch_pb2 as pb

from control.domain.compliance import UPLOAD_IN_FLIGHT_GRACE_SECONDS
from control.ingest.sink_format import verified_records
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulator
from tests.conftest import wait_capturing
from tests.conftest import wait_for
from tests.faults.checker import GRACE_SECONDS
from tests.faults.checker import Pause
from tests.faults.checker import check
from tests.faults.checker import read_truth
from tests.faults.harness import LEASE_TTL
from tests.test_ingest_e2e import GatewayProcess

AGENTS = 40
UPLOAD_EVERY = 1.0
FAULTS = {
    "silent-liar": 0.1,
    "exfiltrator": 0.1,
    "lie": 0.05,
    "ignore": 0.05,
    "stubborn": 0.05,
    "slow": 0.05,
    "offline": 0.05,
    "sleep": 0.05,
}
# Agents that capture whatever their lease says: their events may land up to the pause
# (they upload what they captured before it), never after it.
LIARS = frozenset({"silent-liar", "lie", "exfiltrator"})
# Agents that follow the protocol, however slowly or intermittently: never flagged.
HONEST = frozenset({"none", "slow", "offline", "sleep"})


@pytest.fixture
def gateway(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> Iterator[tuple[ServerProcess, GatewayProcess]]:
    server = start_server()
    started = GatewayProcess(server, tmp_path / "ingest")
    yield server, started
    started.stop()


def sink_events(data_dir: Path) -> dict[str, list[float]]:
    """Capture time of every event in the sink, per agent, checksums verified."""
    found: dict[str, list[float]] = defaultdict(list)
    for entry, record in verified_records(data_dir, None):
        batch = pb.UploadBatchRequest.FromString(record)
        assert batch.agent_id == entry.agent, "a batch filed under another agent"
        found[batch.agent_id] += [nanos / 1e9 for nanos in batch.captured_at_unix_nano]
    return found


def drill_fleet(
    simulate: Callable[..., Simulator],
    server: ServerProcess,
    ingest: GatewayProcess,
    *,
    agents: int,
    faults: dict[str, float],
    truth_path: Path,
    extra: tuple[str, ...] = (),
) -> Simulator:
    """Agents uploading every UPLOAD_EVERY s, faults held back until SIGUSR1."""
    return simulate(
        server,
        agents,
        "--ingest",
        ingest.address,
        "--truth",
        str(truth_path),
        "--fault",
        ",".join(f"{kind}={share}" for kind, share in faults.items()),
        "--fault-after",
        "3600",
        "--upload-every",
        str(UPLOAD_EVERY),
        "--capture-tick",
        "0.2",
        "--slow-max",
        "3",
        *extra,
    )


def test_drill_every_fault_kind_against_the_ingest_gateway(
    gateway: tuple[ServerProcess, GatewayProcess],
    simulate: Callable[..., Simulator],
    tmp_path: Path,
) -> None:
    server, ingest = gateway
    cli = Cli(server)
    truth_path = tmp_path / "truth.json"
    sim = drill_fleet(simulate, server, ingest, agents=AGENTS, faults=FAULTS, truth_path=truth_path)
    wait_capturing(cli, AGENTS)
    wait_for(lambda: ingest.records() >= AGENTS, 30, "every agent's first batch in the sink")
    # Before the pause most batches land on the plane's standing copy, unasked: the
    # drill below is also the proof that the copy lets nothing late in.
    on_copy = 'killswitch_ingest_verdicts_total{source="standing_copy"}'
    wait_for(lambda: ingest.metric(on_copy) >= AGENTS, 30, "batches let in on the copy")
    sim.proc.send_signal(signal.SIGUSR1)  # every fault strikes now, before the pause
    wait_for(lambda: read_truth(truth_path)["trigger_at"], 10, "the faults to strike")

    hold = cli.pause("--all", "--reason", "drill", "--ticket", "INC-14")
    created = {h["id"]: h for h in cli.json("holds")["holds"]}[hold]["created_at"]
    committed = datetime.fromisoformat(created).timestamp()
    # Long enough for every lease to run out, the slow agents to ack, and the offline
    # and sleeping ones to come back (two lease TTLs), plus uploads after all of that.
    time.sleep(max(0.0, committed + 3 * LEASE_TTL + 4 * UPLOAD_EVERY - time.time()))

    truth = read_truth(truth_path, newer_than=time.time())
    views = cli.agents()
    kinds = {row["agent_id"]: row["fault"] for row in truth["agents"]}
    landed = sink_events(ingest.data_dir)

    # The truth x verdict table.
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for agent_id, kind in kinds.items():
        table[kind][views[agent_id]["state"]] += 1
    print("\nDRILL: fault kind x server state (agents)")
    for kind in sorted(table):
        print(f"| {kind} | {dict(sorted(table[kind].items()))} |")

    # No event in the sink captured after the pause: liars' up to the pause itself (plus
    # the skew allowance), lease-honouring agents' up to one lease TTL after it.
    late: list[tuple[str, str, float]] = []
    for agent_id, times in landed.items():
        allowance = GRACE_SECONDS + (0.0 if kinds[agent_id] in LIARS else LEASE_TTL)
        late += [(agent_id, kinds[agent_id], at) for at in times if at > committed + allowance]
    print(f"events in the sink: {sum(map(len, landed.values()))}; after the pause: {len(late)}")
    assert not late, f"captured after the pause and accepted: {late[:5]}"

    # Every silent liar flagged, soon after its first upload after the pause.
    liars = [a for a, k in kinds.items() if k == "silent-liar"]
    assert liars and all(views[a]["state"] == "VIOLATION" for a in liars), {
        a: views[a]["state"] for a in liars
    }
    slowest = max(datetime.fromisoformat(views[a]["since"]).timestamp() for a in liars)
    # Its first upload after the pause comes within one interval of its pause ack.
    assert slowest - committed <= 2 * UPLOAD_EVERY + 2.0, slowest - committed

    # No honest agent flagged.
    flagged = [a for a, k in kinds.items() if k in HONEST and views[a]["state"] == "VIOLATION"]
    assert not flagged, flagged

    # The promise for everyone but the exfiltrators, which no server-side check can see
    # (README: the residual risk); they are reported, not excused.
    seen = {**truth, "agents": [r for r in truth["agents"] if r["fault"] != "exfiltrator"]}
    verdict = check("drill", seen, [Pause(committed)], lease_ttl=LEASE_TTL, server_states=[views])
    exfiltrators = [r for r in truth["agents"] if r["fault"] == "exfiltrator"]
    print(
        f"exfiltrators: {len(exfiltrators)}, still capturing by the truth:"
        f" {sum(bool(r['capturing']) for r in exfiltrators)} (uncaught by design)"
    )
    verdict.assert_holds()


# Far below the backlog the liars build before the pause: 13 events a tick, 5 ticks a
# second, 5 shipped a second.
BATCH_EVENTS = 5
BACKLOG_AGENTS = 12
BACKLOG_FAULTS = {"silent-liar": 0.25, "slow": 0.25}


def test_a_silent_liar_with_a_backlog_is_flagged_for_uploading_while_paused(
    gateway: tuple[ServerProcess, GatewayProcess],
    simulate: Callable[..., Simulator],
    tmp_path: Path,
) -> None:
    """Its batches after the pause hold only events from before it (oldest first), so no
    event is dated after its stop: the upload itself, past any honest batch in flight, is
    the evidence. Honest agents, in flight at the pause too, are never flagged."""
    server, ingest = gateway
    cli = Cli(server)
    truth_path = tmp_path / "truth.json"
    sim = drill_fleet(
        simulate,
        server,
        ingest,
        agents=BACKLOG_AGENTS,
        faults=BACKLOG_FAULTS,
        truth_path=truth_path,
        extra=("--batch-events", str(BATCH_EVENTS)),
    )
    wait_capturing(cli, BACKLOG_AGENTS)
    wait_for(lambda: ingest.records() >= BACKLOG_AGENTS, 30, "every agent's first batch")
    sim.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: read_truth(truth_path)["trigger_at"], 10, "the faults to strike")
    truth = read_truth(truth_path, newer_than=time.time())
    kinds = {row["agent_id"]: row["fault"] for row in truth["agents"]}
    liars = [a for a, k in kinds.items() if k == "silent-liar"]
    backlog = {
        r["agent_id"]: r["events_captured_total"] - r["events_accepted"] for r in truth["agents"]
    }
    assert liars and all(backlog[a] > BATCH_EVENTS for a in liars), backlog

    hold = cli.pause("--all", "--reason", "drill", "--ticket", "INC-14")
    created = {h["id"]: h for h in cli.json("holds")["holds"]}[hold]["created_at"]
    committed = datetime.fromisoformat(created).timestamp()

    def liar_states() -> dict[str, str]:
        views = cli.agents()
        return {a: views[a]["state"] for a in liars}

    wait_for(
        lambda: set(liar_states().values()) == {"VIOLATION"},
        UPLOAD_IN_FLIGHT_GRACE_SECONDS + 20,
        "every backlogged silent liar in VIOLATION",
    )
    # Every honest agent's last batch before its ack has long been decided.
    time.sleep(
        max(0.0, committed + UPLOAD_IN_FLIGHT_GRACE_SECONDS + 3 * UPLOAD_EVERY - time.time())
    )
    views = cli.agents()
    for agent_id in liars:
        assert "after acking its pause" in views[agent_id]["reason"], views[agent_id]
    flagged = [a for a, k in kinds.items() if k in HONEST and views[a]["state"] == "VIOLATION"]
    assert not flagged, {a: views[a]["reason"] for a in flagged}
    late = [
        (agent_id, at)
        for agent_id, times in sink_events(ingest.data_dir).items()
        for at in times
        if kinds[agent_id] == "silent-liar" and at > committed + GRACE_SECONDS
    ]
    assert not late, f"a liar's events captured after the pause were accepted: {late[:5]}"
