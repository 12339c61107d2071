"""An employee's opt-out is one hold per laptop, however often they cycle it.

Issue 15 finding 8: each opt-out used to add a hold that stayed after the opt-in, so
100 cycles left 100 holds that every start and every sync loaded. A real server, the
cycles over the real RPCs, and the store's own table counted.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from killswitch.v1 import killswitch_pb2 as pb

from control.client import Credentials
from control.client import OperatorClient
from control.pki import load_identity
from control.store.sqlite import DB_FILENAME
from tests.conftest import Cli
from tests.conftest import ServerProcess

CYCLES = 100
LAPTOP = "laptop-emp1"


def count(server: ServerProcess, query: str) -> int:
    """One number from the server's database, read-only while it runs."""
    path = server.data_dir / DB_FILENAME
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return int(db.execute(query).fetchone()[0])


def as_employee(server: ServerProcess) -> OperatorClient:
    """The laptop owner's own client: opting out is something only they may do."""
    return OperatorClient(server.address, Credentials(load_identity(server.identity("employee-1"))))


def test_100_opt_out_cycles_keep_one_hold_that_no_resume_lifts(
    server: ServerProcess, cli: Cli, tmp_path: Path
) -> None:
    inventory = tmp_path / "inventory.csv"
    inventory.write_text(f"agent_id,owner\n{LAPTOP},employee-1\nlaptop-other,employee-2\n")
    cli.ok("inventory", "import", str(inventory))
    fleet = cli.pause("--all", "--reason", "incident")
    employee = as_employee(server)
    for _ in range(CYCLES):
        employee.opt_out(pb.OptOutRequest(agent_id=LAPTOP, reason="cycle"))
        employee.opt_in(pb.OptInRequest(agent_id=LAPTOP))
    opted = employee.opt_out(pb.OptOutRequest(agent_id=LAPTOP, reason="mine"))

    assert count(server, "SELECT count(*) FROM holds WHERE kind = 'opt_out'") == 1
    assert count(server, "SELECT count(*) FROM holds") == 2, "the fleet pause and the opt-out"
    assert opted.hold.id == f"opt-out-{LAPTOP}"
    # Every cycle is still on the record.
    opt_outs = f"target LIKE 'opt-out-{LAPTOP} %'"
    assert (
        count(server, f"SELECT count(*) FROM audit_log WHERE action = 'hold.create' AND {opt_outs}")
        == CYCLES + 1
    )
    assert (
        count(server, f"SELECT count(*) FROM audit_log WHERE action = 'hold.lift' AND {opt_outs}")
        == CYCLES
    )

    # Paused by the opt-out; a fleet resume does not lift it, and a restart keeps it.
    cli.resume(fleet)
    assert cli.agents()[LAPTOP]["mode"] == "PAUSED"
    assert cli.agents()["laptop-other"]["mode"] == "ALLOWED"
    server.stop()
    server.start()
    assert cli.agents()[LAPTOP]["mode"] == "PAUSED"
    assert [h["id"] for h in cli.json("holds")["holds"]] == [f"opt-out-{LAPTOP}"]
    employee = as_employee(server)
    employee.opt_in(pb.OptInRequest(agent_id=LAPTOP))
    assert cli.agents()[LAPTOP]["mode"] == "ALLOWED"
