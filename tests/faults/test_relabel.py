"""Fault: labels that would let a laptop out of a pause (issue 13, break 5).

A real mTLS server and simulated agents, each with its own enrolled certificate. After
a pause by ``--selector org=finance`` commits, half the fleet (the ``relabel`` fault)
reconnects claiming ``org=marketing``. The ground truth must show no finance laptop
capturing later than the pause commit + lease TTL + 2 s, and the server must show,
count and audit the contradiction while keeping the server's labels.

With two replicas, an operator's import on one relabels the laptops the other serves,
and a pause by selector committed right after it stops them.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulator.faults import Fault
from simulator.fleet import fault_counts
from simulator.fleet import fleet_configs
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulator
from tests.conftest import wait_capturing
from tests.conftest import wait_for
from tests.faults.checker import Pause
from tests.faults.checker import check
from tests.faults.checker import read_truth
from tests.faults.harness import Fleet

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


def connected_to(replica: ServerProcess) -> set[str]:
    """The agents that ever opened a stream to ``replica``, from its debug log."""
    lines = replica.log_path.read_text(errors="replace").splitlines()
    return {json.loads(line)["agent_id"] for line in lines if '"agent_connected"' in line}


def test_an_import_on_one_replica_relabels_the_laptops_another_serves(
    fleet_of: Callable[..., Fleet], pg_dsn: str, tmp_path: Path
) -> None:
    """Two replicas on one database; the inventory import goes to the first and moves
    laptops that only the second serves into org=finance; a pause by selector is
    committed on the first right after it, with no wait. The second must stop them
    within the lease TTL (its re-read takes the labels with the pause), by the truth."""
    fleet = fleet_of(20, dsns=[pg_dsn, pg_dsn])
    importer, other = fleet.replicas

    def all_known_to_the_importer() -> dict[str, dict[str, Any]] | None:
        """The importer learns of the second replica's laptops from the database, a moment
        after they connect: this reads them all, not a race the CLI's speed decides."""
        agents = fleet.cli(importer).agents()
        return agents if len(agents) == 20 else None

    before: dict[str, dict[str, Any]] = wait_for(all_known_to_the_importer, 30, "20 agents known")
    only_other = connected_to(other) - connected_to(importer)
    movers = {a for a in only_other if before[a]["labels"]["org"] != "finance"}
    assert movers, "the second replica must serve laptops outside finance"
    finance = {a for a, row in before.items() if row["labels"]["org"] == "finance"}

    inventory = tmp_path / "inventory.csv"
    keys = sorted(before[next(iter(movers))]["labels"])
    rows = [",".join(["agent_id", *keys])]
    for agent_id in sorted(movers):
        labels = {**before[agent_id]["labels"], "org": "finance"}
        rows.append(",".join([agent_id, *(labels[k] for k in keys)]))
    inventory.write_text("\n".join(rows) + "\n")
    imported = fleet.cli(importer).ok("inventory", "import", str(inventory))
    assert f"({len(movers)} relabelled)" in imported, imported
    covered = frozenset(finance | movers)
    fleet.pause(importer, "--selector", "org=finance", "--reason", "leak", covers=covered)

    def stopped_everywhere() -> bool:
        return all(
            view[a]["state"] == "VERIFIED_STOPPED" and view[a]["labels"]["org"] == "finance"
            for view in fleet.views()
            for a in covered
        )

    wait_for(stopped_everywhere, 60, "every finance laptop verified stopped on both replicas")
    verdict = fleet.verdict("relabelled on another replica")
    verdict.assert_holds()
    for view in fleet.views():
        assert all(view[a]["mode"] == "ALLOWED" for a in set(view) - covered), "only finance"
