"""Readiness end to end: a real server, simulated agents that differ as laptops do.

Agents say their version, their lease clock and (through their Hello's send time)
their clock skew; the server judges them against `serve --min-agent-version` and the
other policy settings. The CLI, the dashboard and /metrics give the same answer.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulate
from tests.conftest import StartServer
from tests.conftest import wait_for
from tests.dashboard_support import Http
from tests.dashboard_support import session_for

CANNOT = {
    "old-00000": ["old-agent"],
    "old-00001": ["old-agent"],
    "noclock-00000": ["no-sleep-clock"],
    "spare-0": ["never-connected"],
}
WARNED = {"skew-00000": ["clock-skew"]}


def readiness(cli: Cli) -> tuple[int, dict[str, Any]]:
    result = cli.run("readiness", "--json")
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def classes_by_agent(report: dict[str, Any]) -> dict[str, list[str]]:
    return {f["agent_id"]: f["classes"] for f in report["findings"]}


def started_fleet(start_server: StartServer, simulate: Simulate) -> tuple[ServerProcess, Cli]:
    """A server that wants agents of 0.2.0 or later, and what both tests' fleets have:
    three current laptops and one whose clock is 600 s off."""
    server = start_server("--min-agent-version", "0.2.0")
    simulate(server, 3)
    simulate(server, 1, "--id-prefix", "skew", "--clock-skew", "600")
    return server, Cli(server)


def test_readiness_lists_exactly_the_laptops_that_cannot_honour_and_exits_1(
    start_server: StartServer, simulate: Simulate
) -> None:
    server, cli = started_fleet(start_server, simulate)
    simulate(server, 2, "--id-prefix", "old", "--agent-version", "agent-stub/0.1.0")
    simulate(server, 1, "--id-prefix", "noclock", "--no-sleep-clock")
    inventory = server.data_dir.parent / "inventory.csv"
    inventory.write_text("agent_id,region\nspare-0,eu\n")
    cli.ok("inventory", "import", str(inventory))

    wanted = CANNOT | WARNED

    def every_laptop_judged() -> bool:
        """Every finding in, and the three good laptops connected too: on a slow box the
        first simulator's agents can come in after the others' findings."""
        report = readiness(cli)[1]
        return classes_by_agent(report) == wanted and report["agents"] == 8

    wait_for(every_laptop_judged, 60, "every laptop judged")
    code, report = readiness(cli)
    assert code == 1
    assert (report["agents"], report["ready"], report["cannot_honour"]) == (8, 3, 4)
    assert {f["agent_id"] for f in report["findings"] if f["cannot_honour"]} == set(CANNOT)
    assert report["classes"]["old-agent"] == {"agents": 2, "cannot_honour": True}
    assert report["classes"]["clock-skew"] == {"agents": 1, "cannot_honour": False}
    skew = next(f for f in report["findings"] if f["agent_id"] == "skew-00000")
    assert "+600s off" in skew["details"][0] or "+599s off" in skew["details"][0]

    text = cli.run("readiness")
    assert text.returncode == 1 and "4 cannot honour a pause now" in text.stdout

    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics") as reply:
        metrics = reply.read().decode()
    assert 'killswitch_readiness_agents{class="old-agent",severity="cannot-honour"} 2.0' in metrics
    assert 'killswitch_readiness_agents{class="clock-skew",severity="warning"} 1.0' in metrics

    sre = session_for(server, "sre-1")
    assert classes_by_agent(sre.json("/api/readiness")) == wanted
    home = sre.get("/")
    assert 'id="readiness"' in home.text and "noclock-00000" in home.text
    approver: Http = session_for(server, "approver-1")
    assert approver.get("/api/readiness").status == 403
    assert 'id="readiness"' not in approver.get("/").text
    # The role table says approvers cannot read it over gRPC either.
    refused = cli.as_("approver-1").run("readiness")
    assert refused.returncode != 0 and "permission" in refused.stderr.lower()


def test_a_ready_fleet_exits_0_even_with_warnings(
    start_server: StartServer, simulate: Simulate
) -> None:
    _, cli = started_fleet(start_server, simulate)
    wait_for(lambda: readiness(cli)[1]["agents"] == 4, 60, "every laptop connected")
    wait_for(lambda: classes_by_agent(readiness(cli)[1]) == WARNED, 30, "the skew measured")
    code, report = readiness(cli)
    assert code == 0
    assert (report["agents"], report["ready"], report["cannot_honour"]) == (4, 3, 0)
