"""``readiness``, ``holds``, ``status``, ``agents``, ``ack-violation``, ``inventory import``:
what the fleet is doing, and what the server expects of it."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

from killswitch.v1 import killswitch_pb2 as pb

from control.cli.exit_codes import EXIT_FAILED
from control.cli.options import add_command
from control.cli.options import add_group
from control.cli.options import add_quiet_option
from control.cli.output import agent_json
from control.cli.output import agent_rows
from control.cli.output import ago
from control.cli.output import hold_json
from control.cli.output import print_json
from control.cli.output import print_table
from control.cli.output import scope_text
from control.client import OperatorClient
from control.domain import ComplianceState
from control.domain import parse_label_pairs
from control.domain import parse_selector
from control.domain import validate_agent_id
from control.errors import InvalidInput

# Agents per ExpectAgents call: keeps every message well under the server's size cap.
INVENTORY_BATCH = 500


def cmd_readiness(args: argparse.Namespace, client: OperatorClient) -> int:
    report = client.get_readiness(pb.GetReadinessRequest())
    cannot_honour = sum(f.cannot_honour for f in report.findings)
    if args.json:
        print_json(
            {
                "agents": report.agents,
                "ready": report.ready,
                "cannot_honour": cannot_honour,
                "policy": report.policy,
                "classes": {
                    c.name: {"agents": c.agents, "cannot_honour": c.cannot_honour}
                    for c in report.classes
                },
                "findings": [
                    {
                        "agent_id": f.agent_id,
                        "classes": list(f.classes),
                        "details": list(f.details),
                        "cannot_honour": f.cannot_honour,
                    }
                    for f in report.findings
                ],
            }
        )
    else:
        print(
            f"{report.ready} of {report.agents} agents ready;"
            f" {cannot_honour} cannot honour a pause now,"
            f" {len(report.findings) - cannot_honour} with warnings only"
        )
        print(f"policy: {report.policy}")
        rows = [["agent", "severity", "classes", "why"]]
        rows += [
            [
                f.agent_id,
                "CANNOT HONOUR" if f.cannot_honour else "warning",
                ",".join(f.classes),
                "; ".join(f.details),
            ]
            for f in report.findings
        ]
        if report.findings:
            print_table(rows)
    return EXIT_FAILED if cannot_honour else 0


def cmd_holds(args: argparse.Namespace, client: OperatorClient) -> int:
    response = client.list_holds(pb.ListHoldsRequest())
    if args.json:
        print_json({"epoch": response.epoch, "holds": [hold_json(h) for h in response.holds]})
        return 0
    if not response.holds:
        print(f"no active holds (epoch {response.epoch}): capture is allowed fleet-wide")
        return 0
    rows = [["HOLD", "SCOPE", "REASON", "TICKET", "CREATED BY", "CREATED", "EPOCH"]]
    for h in response.holds:
        rows.append(
            [
                h.id,
                scope_text(h.scope),
                h.reason,
                h.ticket or "-",
                h.created_by,
                ago(h.created_at),
                str(h.created_epoch),
            ]
        )
    print_table(rows)
    return 0


def cmd_status(args: argparse.Namespace, client: OperatorClient) -> int:
    status = client.get_status(pb.GetStatusRequest())
    by_state = {c.state: c.count for c in status.by_state}
    if args.json:
        print_json(
            {
                "epoch": status.epoch,
                "holds": [hold_json(h) for h in status.holds],
                "agents": {
                    "total": status.total,
                    "by_state": dict(sorted(by_state.items())),
                    "settled": status.settled,
                },
                "compliant": status.compliant,
            }
        )
        return 0
    print(f"epoch {status.epoch}, {len(status.holds)} active holds")
    for h in status.holds:
        print(f"  {h.id}  {scope_text(h.scope)}  {h.reason}  ({h.created_by}, {ago(h.created_at)})")
    print(f"{status.total} agents, {status.settled} settled")
    for state in ComplianceState:
        if by_state.get(state.value):
            print(f"  {state.value:<16} {by_state[state.value]}")
    print("COMPLIANT" if status.compliant else "NOT COMPLIANT")
    return 0


def cmd_agents(args: argparse.Namespace, client: OperatorClient) -> int:
    agent_filter = pb.AgentFilter(hold_id=args.hold or "")
    if args.state:
        agent_filter.state = _parse_state(args.state)
    if args.selector:
        agent_filter.match_labels.update(parse_selector(args.selector))
    agents = list(client.list_agents(pb.ListAgentsRequest(filter=agent_filter)))
    if args.json:
        print_json([agent_json(a) for a in agents])
    elif args.quiet:
        for agent in agents:
            print(agent.agent_id)
    elif agents:
        print_table(agent_rows(agents))
    else:
        print("no agents match")
    return 0


def _parse_state(text: str) -> str:
    try:
        return ComplianceState(text.upper()).value
    except ValueError:
        known = ", ".join(s.value for s in ComplianceState)
        raise InvalidInput(f"unknown state {text!r}; one of: {known}") from None


def cmd_ack_violation(args: argparse.Namespace, client: OperatorClient) -> int:
    request = pb.AcknowledgeViolationRequest(agent_id=args.agent_id, note=args.note)
    response = client.acknowledge_violation(request)
    print(f"violation on {args.agent_id} acknowledged: {response.violation}")
    return 0


def read_inventory(path: Path) -> list[pb.ExpectedAgent]:
    """CSV with an ``agent_id`` column; every other column becomes a label."""
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "agent_id" not in reader.fieldnames:
                raise InvalidInput(
                    f"{path}: the first line must be a header with an agent_id column"
                )
            agents = []
            for line, row in enumerate(reader, start=2):
                try:
                    agent_id = validate_agent_id((row.pop("agent_id") or "").strip())
                    labels = parse_label_pairs(f"{k}={v}" for k, v in row.items() if k and v)
                except InvalidInput as exc:
                    raise InvalidInput(f"{path}:{line}: {exc}") from None
                agents.append(pb.ExpectedAgent(agent_id=agent_id, labels=labels))
            return agents
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None


def cmd_inventory_import(args: argparse.Namespace, client: OperatorClient) -> int:
    agents = read_inventory(Path(args.file))
    added = known = relabelled = 0
    for start in range(0, len(agents), INVENTORY_BATCH):
        batch = agents[start : start + INVENTORY_BATCH]
        response = client.expect_agents(pb.ExpectAgentsRequest(agents=batch))
        added, known = added + response.added, known + response.already_known
        relabelled += response.relabelled
    print(f"{added} agents added to the inventory, {known} already known ({relabelled} relabelled)")
    return 0


def add_commands(sub: Any) -> None:
    readiness = add_command(
        sub,
        "readiness",
        "laptops that would not honour a pause now, by class; exit 1 if any cannot",
        cmd_readiness,
    )
    readiness.add_argument("--json", action="store_true")

    holds = add_command(sub, "holds", "list the active holds", cmd_holds)
    holds.add_argument("--json", action="store_true")

    status = add_command(sub, "status", "fleet compliance summary", cmd_status)
    status.add_argument("--json", action="store_true")

    agents = add_command(sub, "agents", "one row per agent", cmd_agents)
    agents.add_argument("--state", help="only agents in this compliance state")
    agents.add_argument("--selector", help="only agents whose labels match k=v[,k=v...]")
    agents.add_argument("--hold", metavar="HOLD_ID", help="only agents in this hold's scope")
    agents.add_argument("--json", action="store_true")
    add_quiet_option(agents, "agent ids, one per line")

    ack = add_command(
        sub,
        "ack-violation",
        "acknowledge an agent's VIOLATION after investigating it",
        cmd_ack_violation,
    )
    ack.add_argument("agent_id", metavar="AGENT_ID")
    ack.add_argument("--note", required=True, help="what was found and what was done")

    inventory = add_group(sub, "inventory", "the expected fleet")
    imp = add_command(
        inventory, "import", "register expected agents from a CSV file", cmd_inventory_import
    )
    imp.add_argument("file", help="CSV with an agent_id column; other columns become labels")
