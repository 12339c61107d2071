"""Fault: an agent that relabels itself to walk out of a pause (issue 13, break 5).

A real mTLS server and simulated agents, each with its own enrolled certificate. After
a pause by ``--selector org=finance`` commits, half the fleet (the ``relabel`` fault)
reconnects claiming ``org=marketing``. The ground truth must show no finance laptop
capturing later than the pause commit + lease TTL + 2 s, and the server must show,
count and audit the contradiction while keeping the server's labels.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from agent_stub.config import Fault
from agent_stub.simulate import fault_counts, fleet_configs
from tests.conftest import Cli, ServerProcess, Simulator, wait_capturing, wait_for
from tests.faults.checker import Pause, check, read_truth

AGENTS = 24
SEED = 5  # a fleet with finance laptops among the relabellers
LEASE_TTL = 5.0  # conftest's FAST_TIMINGS


def metric(server: ServerProcess, name: str) -> float:
    url = f"http://127.0.0.1:{server.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    (line,) = [x for x in text.splitlines() if x.startswith(f"{name} ")]
    return float(line.split()[1])


def test_a_paused_agent_that_relabels_itself_captures_nothing_late(
    server: ServerProcess,
    cli: Cli,
    simulate: Callable[..., Simulator],
    tmp_path: Path,
) -> None:
    fleet = fleet_configs(AGENTS, seed=SEED, faults=fault_counts({Fault.RELABEL: 0.5}, AGENTS))
    finance = {c.agent_id for c in fleet if c.labels["org"] == "finance"}
    escapers = {c.agent_id for c in fleet if c.agent_id in finance and c.fault is Fault.RELABEL}
    assert escapers, "the fleet must have finance laptops that relabel themselves"
    truth_path = tmp_path / "truth.json"
    sim = simulate(
        server,
        AGENTS,
        "--seed",
        str(SEED),
        "--fault",
        "relabel=0.5",
        "--fault-after",
        "3600",  # SIGUSR1 triggers it, after the pause
        "--truth",
        str(truth_path),
        "--capture-tick",
        "0.2",
        "--upload-every",
        "1",
    )
    wait_capturing(cli, AGENTS, timeout=60)

    committed_at = time.time()  # the commit happens after this: a strict bound
    cli.pause("--selector", "org=finance", "--reason", "leak in finance")
    sim.proc.send_signal(signal.SIGUSR1)

    def claimed() -> bool:
        agents = cli.agents()
        return all(agents[a]["reported_labels"].get("org") == "marketing" for a in escapers)

    wait_for(claimed, 30, "the relabellers to reconnect claiming org=marketing")
    time.sleep(2 * LEASE_TTL)  # any lease they got would have let them capture by now
    agents = cli.agents()
    truth = read_truth(truth_path, newer_than=time.time())
    verdict = check(
        "relabel",
        truth,
        [Pause(committed_at, frozenset(finance))],
        lease_ttl=LEASE_TTL,
        server_states=[agents],
    )
    verdict.assert_holds()

    for agent_id in escapers:
        row = agents[agent_id]
        assert row["labels"]["org"] == "finance" and row["mode"] == "PAUSED", row
        assert row["label_mismatch"] == {"org": {"server": "finance", "reported": "marketing"}}
    assert metric(server, "killswitch_agents_label_mismatch") == sum(
        c.fault is Fault.RELABEL for c in fleet
    )
    audited = [e["target"] for e in cli.json("audit") if e["action"] == "agent.label_mismatch"]
    assert sorted(audited) == sorted(c.agent_id for c in fleet if c.fault is Fault.RELABEL)
    assert "LABEL MISMATCH" in cli.ok("agents", "--selector", "org=finance")
    sim.stop()
