"""The drill: every fault strikes, the whole fleet is paused, and the verdicts are read.

After three lease TTLs and two upload intervals, the fault kind x server state table
is read, the sink is audited for events captured after the pause, and the truth the
simulators wrote is checked (``tests.faults.checker``). Product only: the baseline has
no control plane behind its sink.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from collections import defaultdict
from pathlib import Path

from killswitch.v1 import killswitch_pb2 as pb

from agent_stub.config import DEFAULT_LEASE_TTL_SECONDS
from bench.console import log
from bench.harness import INCIDENT_COMMANDER
from bench.harness import Operator
from bench.harness import person
from bench.ingest_drill.processes import Fleet
from bench.ingest_load import late_in_sink
from tests.faults.checker import GRACE_SECONDS
from tests.faults.checker import Pause
from tests.faults.checker import check

LIARS = frozenset({"silent-liar", "lie", "exfiltrator"})
HONEST = frozenset({"none", "slow", "offline", "sleep"})


def drill_wait(args: argparse.Namespace) -> float:
    """From the pause to reading the verdicts: three lease TTLs and two upload rounds."""
    return 3 * float(args.lease_ttl or DEFAULT_LEASE_TTL_SECONDS) + 2 * float(args.upload_every)


def drill(
    args: argparse.Namespace, op: Operator, grpc_port: int, fleet: Fleet, here: Path
) -> list[str]:
    """The drill table and its findings."""
    lease_ttl = float(args.lease_ttl or DEFAULT_LEASE_TTL_SECONDS)
    fleet.strike()  # every fault strikes now, before the pause
    deadline = time.monotonic() + 30
    while not fleet.truth(timeout=30)["trigger_at"]:
        if time.monotonic() > deadline:
            raise TimeoutError("the faults did not strike")
        time.sleep(0.5)
    ic = person(f"127.0.0.1:{grpc_port}", *INCIDENT_COMMANDER, None)
    hold = ic.create_hold(
        pb.CreateHoldRequest(scope=pb.Scope(all=True), reason="ingest drill", ticket="INC-14")
    )
    ic.close()
    committed = hold.hold.created_at.ToNanoseconds() / 1e9
    # Every lease runs out, slow agents ack, offline and sleeping ones come back
    # (two lease TTLs), and two upload rounds after all of that.
    wait = drill_wait(args)
    log(f"product: paused the fleet; the drill reads the verdicts in {wait:.0f}s")
    time.sleep(max(0.0, committed + wait - time.time()))

    if not fleet.alive():  # a fleet stopped early would leave a stale truth
        raise RuntimeError(f"the fleet exited during the drill: {fleet.log_tail(3)}")
    truth = fleet.truth(newer_than=time.time(), timeout=60)
    records: dict[str, pb.AgentRecord] = {r.agent_id: r for r in op.agents()}
    views = {a: {"state": r.state} for a, r in records.items()}
    kinds = {row["agent_id"]: row["fault"] for row in truth["agents"]}
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for agent_id, kind in kinds.items():
        table[kind][records[agent_id].state if agent_id in records else "UNKNOWN"] += 1
    states = sorted({s for row in table.values() for s in row})
    lines = [
        f"| fault kind (agents) | {' | '.join(states)} |",
        "|---|" + "---|" * len(states),
    ]
    for kind in sorted(table):
        cells = " | ".join(str(table[kind].get(s, "")) for s in states)
        lines.append(f"| {kind} ({sum(table[kind].values())}) | {cells} |")

    allowance = {a: GRACE_SECONDS + (0.0 if k in LIARS else lease_ttl) for a, k in kinds.items()}
    audit = late_in_sink(here / "ingest", committed, allowance)
    liars = [a for a, k in kinds.items() if k == "silent-liar"]
    flagged = [a for a in liars if records[a].state == "VIOLATION"]
    flag_after = [records[a].since.ToNanoseconds() / 1e9 - committed for a in flagged]
    honest_flagged = [
        a for a, k in kinds.items() if k in HONEST and records[a].state == "VIOLATION"
    ]
    seen = {**truth, "agents": [r for r in truth["agents"] if r["fault"] != "exfiltrator"]}
    verdict = check("drill", seen, [Pause(committed)], lease_ttl=lease_ttl, server_states=[views])
    exfiltrators = [r for r in truth["agents"] if r["fault"] == "exfiltrator"]
    bound = 2 * args.upload_every + 2.0
    in_time = len(flagged) == len(liars) and max(flag_after, default=0.0) <= bound
    met = "met" if in_time else "MISSED"
    lines += [
        "",
        f"- silent liars in VIOLATION: **{len(flagged)}/{len(liars)}**; flagged"
        f" {max(flag_after, default=math.nan):.1f} s after the pause at the latest"
        f" (bound: one upload interval to their next upload after the ack + 2 s, taken"
        f" as {bound:g} s after the pause: {met})",
        f"- honest agents (none, slow, offline, sleep) in VIOLATION: **{len(honest_flagged)}**",
        f"- events in the sink: {audit.events} in {audit.batches} batches; read back and"
        f" checked event by event (received from 10 s before the pause on):"
        f" {audit.checked_batches} batches, {audit.bad_checksums} bad checksums;"
        f" **captured after the pause (+ grace {GRACE_SECONDS:g} s, + one lease TTL for"
        f" lease-honouring agents): {len(audit.late)}**",
        f"- truth checker (every kind but the exfiltrators): {verdict.row()}",
        f"- exfiltrators: {len(exfiltrators)}, still capturing by the truth:"
        f" {sum(bool(r['capturing']) for r in exfiltrators)} (uncaught by design: the"
        " residual risk)",
    ]
    return lines
