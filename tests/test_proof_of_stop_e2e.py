"""Proof of stop against ground truth: a real server, a fault-injecting simulated fleet.

The simulator writes what really happened on every agent (--truth); the server only
sees the wire. These tests compare the server's verdicts with that truth.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulator
from tests.conftest import wait_for

LEASE_TTL = 5.0
FAULTS = ["ignore", "lie", "stubborn", "offline", "slow", "sleep"]
# What the server must conclude about each kind once the drill has played out.
EXPECTED = {
    "none": "VERIFIED_STOPPED",
    "slow": "VERIFIED_STOPPED",
    "offline": "VERIFIED_STOPPED",
    "sleep": "VERIFIED_STOPPED",
    "ignore": "OVERDUE",
    "lie": "VIOLATION",
    "stubborn": "FAILED",
}
HONEST = {"none", "slow", "offline", "sleep"}


def read_truth(path: Path) -> dict[str, dict[str, Any]]:
    data = json.loads(path.read_text())
    return {a["agent_id"]: a for a in data["agents"]}


def confusion(truth: dict[str, dict[str, Any]], verdicts: dict[str, str]) -> str:
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for agent_id, row in truth.items():
        table[row["fault"]][verdicts[agent_id]] += 1
    states = sorted({s for counts in table.values() for s in counts})
    lines = ["| truth \\ verdict | " + " | ".join(states) + " |", "|---|" + "---|" * len(states)]
    for fault in sorted(table):
        lines.append(f"| {fault} | " + " | ".join(str(table[fault][s]) for s in states) + " |")
    return "\n".join(lines)


def test_drill_verdicts_match_ground_truth(
    start_server: Callable[..., ServerProcess], simulate: Callable[..., Simulator], tmp_path: Path
) -> None:
    server = start_server("--ack-deadline", "8")
    cli = Cli(server)
    truth_path = tmp_path / "truth.json"
    agents = 300
    sim = simulate(
        server, agents,
        "--fault", ",".join(f"{kind}=0.05" for kind in FAULTS),
        "--truth", str(truth_path), "--fault-after", "3600", "--slow-max", "3",
        "--capture-tick", "0.2", "--upload-every", "1", "--seed", "11",
    )  # fmt: skip
    wait_for(
        lambda: cli.json("status")["agents"]["by_state"].get("CAPTURING") == agents,
        60,
        "the whole fleet capturing",
    )
    wait_for(lambda: all(a["lease_expires_at"] for a in cli.agents().values()), 30, "leases")
    sim.proc.send_signal(signal.SIGUSR1)  # the faults strike
    wait_for(truth_path.exists, 10, "ground truth")
    truth = read_truth(truth_path)
    kinds = Counter(row["fault"] for row in truth.values())
    assert all(kinds[k] == 15 for k in FAULTS), kinds
    gone = {a for a, row in truth.items() if row["fault"] in {"offline", "sleep"}}

    def dropped_out() -> bool:
        offline = {a for a, r in cli.agents().items() if r["state"] == "OFFLINE"}
        return offline == gone

    wait_for(dropped_out, 15, "offline and sleeping agents to drop out")

    hold_id = cli.pause("--all", "--reason", "drill")
    early = cli.agents()
    assert {early[a]["state"] for a in gone} <= {"OFFLINE_AT_RISK", "OFFLINE_LEASE_EXPIRED"}

    def played_out() -> dict[str, str] | None:
        verdicts = {a: r["state"] for a, r in cli.agents().items()}
        expected = {a: EXPECTED[row["fault"]] for a, row in truth.items()}
        return verdicts if verdicts == expected else None

    try:
        verdicts = wait_for(played_out, 60, "every verdict to match the ground truth")
    finally:
        final = {a: r["state"] for a, r in cli.agents().items()}
        print("\nconfusion table (rows: injected fault, columns: server verdict)")
        print(confusion(truth, final))
        print("simulator exit code:", sim.proc.poll(), "log tail:\n", sim.log())
    flagged = {a for a, state in verdicts.items() if state == "VIOLATION"}
    assert flagged == {a for a, row in truth.items() if row["fault"] == "lie"}
    assert not any(truth[a]["fault"] in HONEST for a in flagged), "an honest agent was flagged"
    liars = cli.agents("--state", "VIOLATION")
    assert all(
        ("rose" in r["reason"] or "upload" in r["reason"] or "active" in r["reason"])
        for r in liars.values()
    )
    status = cli.json("status")
    assert status["compliant"] is False

    time.sleep(1.5)  # the truth file is rewritten every second
    truth = read_truth(truth_path)
    assert [h["id"] for h in status["holds"]] == [hold_id]
    for agent_id, row in truth.items():
        if row["fault"] != "lie":
            assert row["events_without_lease"] == 0, (agent_id, row)
            assert row["capturing"] is False, (agent_id, row)
    # Acknowledging clears the evidence, and a liar that keeps capturing is caught again.
    liar = sorted(flagged)[0]
    assert liars[liar]["reason"] in cli.ok("ack-violation", liar, "--note", "drill: known liar")
    wait_for(lambda: cli.agents()[liar]["state"] == "VIOLATION", 10, "the liar caught again")
    honest = next(a for a, row in truth.items() if row["fault"] == "none")
    refused = cli.run("ack-violation", honest, "--note", "nothing to see")
    assert refused.returncode == 1 and "no violation" in refused.stderr
    # Every violation, and its acknowledgement, is in the tamper-evident audit log.
    audit = cli.as_("sre-1").json("audit")
    violations = [e for e in audit if e["action"] == "agent.violation"]
    assert {e["target"] for e in violations} == flagged
    assert all(e["result"] == "violation" and e["detail"] for e in violations)
    (acked,) = [e for e in audit if e["action"] == "agent.acknowledge_violation"]
    assert (acked["actor"], acked["target"], acked["reason"]) == ("ic-1", liar, "drill: known liar")


def test_no_agent_captures_after_its_lease_expires_while_the_server_is_down(
    start_server: Callable[..., ServerProcess], simulate: Callable[..., Simulator], tmp_path: Path
) -> None:
    server = start_server()
    cli = Cli(server)
    truth_path = tmp_path / "truth.json"
    agents = 100
    simulate(server, agents, "--truth", str(truth_path), "--capture-tick", "0.1",
             "--fault-after", "3600")  # fmt: skip
    wait_for(
        lambda: cli.json("status")["agents"]["by_state"].get("CAPTURING") == agents,
        60,
        "the whole fleet capturing",
    )
    wait_for(lambda: all(a["lease_expires_at"] for a in cli.agents().values()), 30, "leases")
    wait_for(lambda: all(r["capturing"] for r in read_truth(truth_path).values()), 10, "capture")

    cli.run("pause", "--all", "--reason", "kill switch under test")
    server.kill9()
    killed_at = time.time()
    time.sleep(LEASE_TTL + 2.5)

    truth = read_truth(truth_path)
    for agent_id, row in truth.items():
        assert row["capturing"] is False, (agent_id, row)
        assert row["events_without_lease"] == 0, (agent_id, row)
        assert (row["last_event_at"] or 0) <= killed_at + LEASE_TTL + 0.5, (agent_id, row)

    server.start()
    wait_for(
        lambda: cli.json("status")["agents"]["by_state"] == {"VERIFIED_STOPPED": agents},
        60,
        "every agent back, re-acked and verified",
    )
    assert cli.json("status")["compliant"] is True
