"""The signed proof report of an incident, against a real server and a simulated fleet.

The server builds and signs the report; the CLI writes report.json and report.html;
`report verify` checks it offline and names what was altered.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import BIN
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulator
from tests.conftest import wait_capturing
from tests.conftest import wait_for

FLEET = 5
HOSTILE = "<script>alert('pwned')</script> & \"leak\" <img src=x onerror=alert(1)>"


def paused_and_verified(cli: Cli, server: ServerProcess, simulate: Callable[..., Simulator]) -> str:
    simulate(server, FLEET)
    wait_capturing(cli, FLEET)
    hold = cli.pause("--all", "--reason", HOSTILE, "--ticket", "INC-7")
    wait_for(
        lambda: cli.json("status")["agents"]["by_state"].get("VERIFIED_STOPPED") == FLEET,
        30,
        "the whole fleet verified stopped",
    )
    return hold


def verify(cli: Cli, directory: Path) -> tuple[int, str]:
    result = cli.run("report", "verify", str(directory))
    return result.returncode, result.stdout + result.stderr


def edit_row(text: str, agent_id: str, field: str, old: str, new: str) -> str:
    """Change one value in one laptop's row of the pretty-printed report.json."""
    row = text.index(f'"agent_id": "{agent_id}"')
    # Keys are sorted: the row's own fields after agent_id follow it, before the next row's.
    at = text.index(f'"{field}": {old}', row)
    next_row = text.find('"agent_id": ', row + 1)
    assert next_row == -1 or at < next_row, f"{field} is not in {agent_id}'s row"
    start = at + len(f'"{field}": ')
    return text[:start] + new + text[start + len(old) :]


def test_report_proves_the_pause_and_verify_names_an_altered_row(
    server: ServerProcess, cli: Cli, simulate: Callable[..., Simulator], tmp_path: Path
) -> None:
    hold = paused_and_verified(cli, server, simulate)
    out = tmp_path / "incident"
    printed = cli.ok("report", "--hold", hold, "--out", str(out))
    assert f"hold {hold}" in printed and "100.0% verified" in printed
    text = (out / "report.json").read_text()
    report: dict[str, Any] = json.loads(text)["report"]

    # The hold, every laptop, and plausible fleet figures.
    assert report["hold"]["reason"] == HOSTILE and report["hold"]["ticket"] == "INC-7"
    assert report["hold"]["created_by"] == "ic-1"
    agents = cli.agents()
    rows = {r["agent_id"]: r for r in report["laptops"]}
    assert set(rows) == set(agents) and len(rows) == FLEET
    for row in rows.values():
        assert row["state"] == "VERIFIED_STOPPED" and row["acked_pause"]
        assert row["directive_sent_at"] and row["acked_at"] and row["verified_at"]
        assert row["lease_expires_at"] and row["uploads_refused"] == 0
        assert row["events_accepted_after_pause"] == 0 and row["opt_out"] is None
    figures = report["figures"]
    assert figures["verified"] == FLEET and figures["verified_percent"] == 100.0
    assert figures["never_reached"] == []
    p50, p99, everyone = (
        figures["p50_seconds_to_verified"],
        figures["p99_seconds_to_verified"],
        figures["seconds_to_all_verified"],
    )
    assert 0 <= p50 <= p99 <= everyone < 60
    assert everyone == max(r["seconds_to_verified"] for r in rows.values())

    # The audit excerpt: the hold's creation, chained, and a signed checkpoint covering it.
    created = [e for e in report["audit"]["entries"] if e["action"] == "hold.create"]
    assert len(created) == 1 and created[0]["target"].startswith(hold)
    assert created[0]["reason"] == HOSTILE and len(created[0]["hash"]) == 64
    checkpoint = json.loads(report["audit"]["checkpoint"])
    assert checkpoint["seq"] >= created[0]["seq"]

    code, said = verify(cli, out)
    assert code == 0 and f"report intact: hold {hold}, {FLEET} laptops" in said, said

    # One byte changed in one laptop's row: that laptop, and only it, is named.
    victim = sorted(rows)[2]
    (out / "report.json").write_text(edit_row(text, victim, "uploads_refused", "0", "7"))
    code, said = verify(cli, out)
    assert code == 1 and f"TAMPERED: laptop row {victim} was altered" in said, said
    assert not any(a in said for a in rows if a != victim), said

    # A quoted audit entry rewritten: named by its seq.
    forged = text.replace("INC-7", "INC-8", 2)  # the hold's ticket and its audit entry's
    (out / "report.json").write_text(forged)
    code, said = verify(cli, out)
    assert code == 1 and f"audit entry {created[0]['seq']} was altered" in said, said
    assert "section 'hold' was altered" in said, said

    # The signature itself altered.
    document = json.loads(text)
    signature = document["signature"]
    flipped = "A" if signature[10] != "A" else "B"
    document["signature"] = signature[:10] + flipped + signature[11:]
    (out / "report.json").write_text(json.dumps(document))
    code, said = verify(cli, out)
    assert code == 1 and "TAMPERED: the signature: forged" in said, said

    # Re-indented but unchanged still verifies: the values are signed, not the layout.
    (out / "report.json").write_text(json.dumps(json.loads(text), indent=4))
    assert verify(cli, out)[0] == 0


def test_report_html_escapes_what_people_and_agents_wrote(
    server: ServerProcess, cli: Cli, simulate: Callable[..., Simulator], tmp_path: Path
) -> None:
    hold = paused_and_verified(cli, server, simulate)
    out = tmp_path / "incident"
    cli.as_("approver-1").ok("report", "--hold", hold, "--out", str(out))
    page = (out / "report.html").read_text()
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt; &amp; &quot;leak&quot;" in page
    assert page.count("VERIFIED_STOPPED") == FLEET and hold in page


def test_report_is_for_the_people_who_answer_for_the_incident(
    server: ServerProcess, cli: Cli, tmp_path: Path
) -> None:
    hold = cli.pause("--all", "--reason", "leak")
    assert (
        cli.as_("sre-1").run("report", "--hold", hold, "--out", str(tmp_path / "s")).returncode == 0
    )
    refused = cli.as_("employee-1").run("report", "--hold", hold, "--out", str(tmp_path / "e"))
    assert refused.returncode == 1 and "may not call Reports.GetReport" in refused.stderr
    unknown = cli.run("report", "--hold", "hold-nope", "--out", str(tmp_path / "u"))
    assert unknown.returncode != 0 and "unknown hold 'hold-nope'" in unknown.stderr
    assert not (tmp_path / "e").exists() and not (tmp_path / "u").exists()


def test_report_names_laptops_never_reached_and_opt_outs(
    server: ServerProcess, cli: Cli, simulate: Callable[..., Simulator], tmp_path: Path
) -> None:
    simulate(server, FLEET)
    wait_capturing(cli, FLEET)
    inventory = tmp_path / "inventory.csv"
    inventory.write_text("agent_id,region\nspare-1,eu-west\n")
    cli.ok("inventory", "import", str(inventory))
    owned = next(a for a, row in cli.agents().items() if row["labels"].get("owner") == "employee-1")
    cli.as_("employee-1").ok("opt-out", owned, "--reason", "personal time")
    hold = cli.pause("--all", "--reason", "leak")
    wait_for(
        lambda: cli.json("status")["agents"]["by_state"].get("VERIFIED_STOPPED") == FLEET,
        30,
        "the connected fleet verified stopped",
    )
    out = tmp_path / "incident"
    cli.ok("report", "--hold", hold, "--out", str(out))
    report = json.loads((out / "report.json").read_text())["report"]
    figures = report["figures"]
    assert figures["laptops"] == FLEET + 1 and figures["verified"] == FLEET
    assert figures["verified_percent"] == round(100 * FLEET / (FLEET + 1), 2)
    assert figures["seconds_to_all_verified"] is None, "the fleet never reached 100%"
    assert figures["p99_seconds_to_verified"] is not None
    (spare,) = figures["never_reached"]
    assert spare["agent_id"] == "spare-1" and spare["state"] == "NEVER_SEEN" and spare["why"]
    rows = {r["agent_id"]: r for r in report["laptops"]}
    assert rows[owned]["opt_out"]["reason"] == "personal time" and figures["opted_out"] == 1
    assert rows["spare-1"]["directive_sent_at"] is None and rows["spare-1"]["verified_at"] is None

    # A row removed is named, and only that one.
    document = json.loads((out / "report.json").read_text())
    document["report"]["laptops"] = [
        r for r in document["report"]["laptops"] if r["agent_id"] != owned
    ]
    (out / "report.json").write_text(json.dumps(document))
    result = cli.run("report", "verify", str(out))
    assert result.returncode == 1, result.stdout
    assert result.stdout.splitlines() == [f"TAMPERED: laptop row {owned} was removed"]


def test_an_insecure_server_has_no_key_to_sign_a_report(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = start_server("--insecure")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        claim = ["--server", server.address, "--insecure", "--as", "ic-1:incident-commander"]
        return subprocess.run(
            [str(BIN / "killswitch"), *args, *claim], capture_output=True, text=True, check=False
        )

    hold = run("pause", "--all", "--reason", "leak").stdout.split()[1]
    refused = run("report", "--hold", hold, "--out", str(tmp_path / "r"))
    assert refused.returncode == 1, refused
    assert "signed with the server key, which an --insecure server does not have" in refused.stderr
    assert not (tmp_path / "r").exists()
