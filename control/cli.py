"""``killswitch``: run the control server, and operate it during an incident.

Exit codes: 0 success; 1 refused or failed; 2 bad input; 3 ``--wait`` timed out;
4 the control server could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import getpass
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from control.domain import (
    ComplianceState,
    parse_label_pairs,
    parse_selector,
    validate_agent_id,
    validate_reason,
)
from control.errors import InvalidInput, KillswitchError
from control.rpc.operator_service import OPERATOR_METADATA_KEY

DEFAULT_SERVER = "127.0.0.1:50051"
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_TIMEOUT, EXIT_UNREACHABLE = 1, 2, 3, 4
RPC_TIMEOUT_SECONDS = 15.0
UNSETTLED_SHOWN = 50


class CliError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ------------------------------------------------------------------ output helpers


def iso(ts: Timestamp) -> str | None:
    if not ts.seconds and not ts.nanos:
        return None
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, UTC).isoformat(
        timespec="milliseconds"
    )


def ago(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    delta = max(0.0, time.time() - (ts.seconds + ts.nanos / 1e9))
    if delta < 120:
        return f"{delta:.0f}s ago"
    if delta < 7200:
        return f"{delta / 60:.0f}m ago"
    return f"{delta / 3600:.1f}h ago"


def scope_json(scope: pb.Scope) -> dict[str, Any]:
    target = scope.WhichOneof("target")
    if target == "selector":
        return {"selector": dict(sorted(scope.selector.match_labels.items()))}
    if target == "agents":
        return {"agents": list(scope.agents.ids)}
    return {"all": True}


def scope_text(scope: pb.Scope) -> str:
    data = scope_json(scope)
    if "selector" in data:
        return ",".join(f"{k}={v}" for k, v in data["selector"].items())
    if "agents" in data:
        ids = data["agents"]
        return "agents " + ",".join(ids[:3]) + (f" (+{len(ids) - 3})" if len(ids) > 3 else "")
    return "all agents"


def hold_json(hold: pb.Hold) -> dict[str, Any]:
    return {
        "id": hold.id,
        "kind": pb.HoldKind.Name(hold.kind).removeprefix("HOLD_KIND_").lower(),
        "scope": scope_json(hold.scope),
        "reason": hold.reason,
        "ticket": hold.ticket,
        "created_by": hold.created_by,
        "created_at": iso(hold.created_at),
        "created_epoch": hold.created_epoch,
        "keep_spool": hold.keep_spool,
    }


def mode_name(mode: int) -> str:
    return pb.Mode.Name(mode).removeprefix("MODE_")  # type: ignore[arg-type]


def agent_json(agent: pb.AgentRecord) -> dict[str, Any]:
    return {
        "agent_id": agent.agent_id,
        "labels": dict(sorted(agent.labels.items())),
        "mode": mode_name(agent.mode),
        "state": agent.state,
        "reason": agent.reason,
        "since": iso(agent.since),
        "connected": agent.connected,
        "last_seen": iso(agent.last_seen),
        "applied_epoch": agent.applied_epoch,
        "desired_epoch": agent.desired_epoch,
        "hold_ids": list(agent.hold_ids),
        "lease_expires_at": iso(agent.lease_expires_at),
        "verified_at": iso(agent.verified_at),
        "events_captured_total": agent.events_captured_total,
        "spool_events": agent.spool_events,
        "uploads_refused": agent.uploads_refused,
    }


def print_table(rows: Sequence[Sequence[str]], out: TextIO = sys.stdout) -> None:
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


def agent_rows(agents: Sequence[pb.AgentRecord]) -> list[list[str]]:
    header = [
        "AGENT",
        "LABELS",
        "MODE",
        "STATE",
        "SINCE",
        "CONNECTED",
        "LAST SEEN",
        "EPOCH",
        "REASON",
    ]
    rows = [header]
    for a in agents:
        labels = ",".join(f"{k}={v}" for k, v in sorted(a.labels.items()))
        rows.append(
            [
                a.agent_id,
                labels,
                mode_name(a.mode),
                a.state,
                ago(a.since),
                "yes" if a.connected else "no",
                ago(a.last_seen),
                str(a.applied_epoch),
                a.reason,
            ]
        )
    return rows


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


# ------------------------------------------------------------------ gRPC client


class OperatorClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.OperatorStub(self._channel)
        self._metadata = ((OPERATOR_METADATA_KEY, f"{getpass.getuser()}@{socket.gethostname()}"),)

    def call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(
                request, timeout=RPC_TIMEOUT_SECONDS, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def stream(self, method: str, request: Any) -> Iterator[Any]:
        try:
            yield from getattr(self._stub, method)(
                request, timeout=RPC_TIMEOUT_SECONDS * 4, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def _error(self, exc: grpc.RpcError) -> CliError:
        code: grpc.StatusCode = exc.code()
        details: str = exc.details() or code.name.lower()
        if code is grpc.StatusCode.UNAVAILABLE:
            return CliError(
                f"cannot reach the control server at {self.address} ({details.splitlines()[0]});"
                " is `killswitch serve` running? Set --server or KILLSWITCH_SERVER",
                EXIT_UNREACHABLE,
            )
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return CliError(
                f"the control server at {self.address} did not answer in time", EXIT_UNREACHABLE
            )
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            return CliError(details, EXIT_BAD_INPUT)
        return CliError(details)


# ------------------------------------------------------------------ commands


def _scope_from_args(args: argparse.Namespace) -> pb.Scope:
    if args.all:
        return pb.Scope(all=True)
    if args.selector is not None:
        return pb.Scope(selector=pb.Selector(match_labels=parse_selector(args.selector)))
    return pb.Scope(agents=pb.AgentIds(ids=[validate_agent_id(a) for a in args.agent]))


def cmd_pause(args: argparse.Namespace, client: OperatorClient) -> int:
    scope = _scope_from_args(args)
    reason = validate_reason(args.reason)
    response = client.call(
        "CreateHold",
        pb.CreateHoldRequest(
            scope=scope, reason=reason, ticket=args.ticket, keep_spool=args.keep_spool
        ),
    )
    hold = response.hold
    print(
        f"hold {hold.id} created at epoch {response.epoch}: pauses {scope_text(hold.scope)}"
        f" ({response.covered_agents} known agents)"
    )
    if not args.wait:
        return 0
    return wait_until_settled(client, hold.id, args.timeout, verb="stopped")


def cmd_resume(args: argparse.Namespace, client: OperatorClient) -> int:
    response = client.call("LiftHold", pb.LiftHoldRequest(hold_id=args.hold))
    print(
        f"hold {response.hold.id} lifted at epoch {response.epoch};"
        " agents still covered by other holds stay paused"
    )
    if not args.wait:
        return 0
    return wait_until_settled(client, response.hold.id, args.timeout, verb="settled")


def wait_until_settled(client: OperatorClient, hold_id: str, timeout: float, *, verb: str) -> int:
    """Poll until every agent in the hold's scope reached its desired state."""
    deadline = time.monotonic() + timeout
    tty = sys.stderr.isatty()
    last_line = ""
    request = pb.GetStatusRequest(
        filter=pb.AgentFilter(hold_id=hold_id), unsettled_limit=UNSETTLED_SHOWN
    )
    while True:
        status = client.call("GetStatus", request)
        waiting = ", ".join(
            f"{c.state} {c.count}" for c in sorted(status.by_state, key=lambda c: c.state)
        )
        line = f"{verb} {status.settled}/{status.total}  [{waiting or 'no agents in scope'}]"
        if line != last_line:
            sys.stderr.write(("\r\x1b[2K" if tty else "") + line + ("" if tty else "\n"))
            sys.stderr.flush()
            last_line = line
        if status.settled == status.total:
            if tty:
                sys.stderr.write("\n")
            print(f"all {status.total} agents in scope {verb} (epoch {status.epoch})")
            return 0
        if time.monotonic() >= deadline:
            if tty:
                sys.stderr.write("\n")
            missing = status.total - status.settled
            print(f"timed out after {timeout:g}s: {missing} of {status.total} agents not {verb}:")
            print_table(agent_rows(status.unsettled))
            if missing > len(status.unsettled):
                print(
                    f"... and {missing - len(status.unsettled)} more"
                    f" (killswitch agents --hold {hold_id} for all)"
                )
            return EXIT_TIMEOUT
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def cmd_holds(args: argparse.Namespace, client: OperatorClient) -> int:
    response = client.call("ListHolds", pb.ListHoldsRequest())
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
    status = client.call("GetStatus", pb.GetStatusRequest())
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
    agents = list(client.stream("ListAgents", pb.ListAgentsRequest(filter=agent_filter)))
    if args.json:
        print_json([agent_json(a) for a in agents])
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
    response = client.call("AcknowledgeViolation", request)
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
    response = client.call("ExpectAgents", pb.ExpectAgentsRequest(agents=agents))
    print(f"{response.added} agents added to the inventory, {response.already_known} already known")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from control.logs import configure_logging
    from control.server import ServerConfig, serve

    configure_logging(args.log_format, args.log_level)
    config = ServerConfig(
        data_dir=Path(args.data_dir),
        grpc_address=args.grpc,
        http_address=args.http,
        ack_deadline=args.ack_deadline,
        heartbeat_interval=args.heartbeat,
        lease_ttl=args.lease_ttl,
    )
    asyncio.run(serve(config))
    return 0


# ------------------------------------------------------------------ argument parsing


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 86_400 * 365:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def add_wait_options(parser: argparse.ArgumentParser, until: str) -> None:
    parser.add_argument("--wait", action="store_true", help=f"wait {until}")
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=300.0,
        help="seconds to wait with --wait, then exit 3 (default 300)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="killswitch", description="Pause capture across the fleet and prove it stopped."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def operator_command(
        name: str, help_text: str, handler: Callable[..., int]
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--server",
            default=os.environ.get("KILLSWITCH_SERVER", DEFAULT_SERVER),
            help="control server HOST:PORT (env KILLSWITCH_SERVER; default %(default)s)",
        )
        p.set_defaults(handler=handler)
        return p

    serve = sub.add_parser("serve", help="run the control server")
    serve.add_argument("--data-dir", required=True, help="directory for the SQLite state")
    serve.add_argument("--grpc", default="127.0.0.1:50051", help="gRPC listen address")
    serve.add_argument("--http", default="127.0.0.1:8080", help="HTTP listen address (probes)")
    serve.add_argument(
        "--ack-deadline",
        type=positive_seconds,
        default=30.0,
        help="seconds before an unacknowledged agent is OVERDUE (default 30)",
    )
    serve.add_argument(
        "--heartbeat",
        type=positive_seconds,
        default=10.0,
        help="heartbeat interval the server asks agents for (default 10)",
    )
    serve.add_argument(
        "--lease-ttl",
        type=positive_seconds,
        default=60.0,
        help="capture lease length; agents renew at a third of it (default 60)",
    )
    serve.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    serve.set_defaults(handler=None)

    pause = operator_command("pause", "pause capture on a scope (adds a hold)", cmd_pause)
    target = pause.add_mutually_exclusive_group(required=True)
    target.add_argument("--all", action="store_true", help="the whole fleet")
    target.add_argument("--selector", help="agents whose labels match k=v[,k=v...]")
    target.add_argument("--agent", action="append", metavar="ID", help="an agent id (repeatable)")
    pause.add_argument("--reason", required=True, help="why; shown to operators and employees")
    pause.add_argument("--ticket", default="", help="incident ticket reference")
    pause.add_argument(
        "--keep-spool",
        action="store_true",
        help="quarantine unsent capture data on the laptops instead of deleting it",
    )
    add_wait_options(pause, "until every covered agent stopped")

    resume = operator_command("resume", "lift one hold", cmd_resume)
    resume.add_argument("--hold", required=True, metavar="HOLD_ID")
    add_wait_options(resume, "until every agent in the hold's scope settled")

    holds = operator_command("holds", "list the active holds", cmd_holds)
    holds.add_argument("--json", action="store_true")

    status = operator_command("status", "fleet compliance summary", cmd_status)
    status.add_argument("--json", action="store_true")

    agents = operator_command("agents", "one row per agent", cmd_agents)
    agents.add_argument("--state", help="only agents in this compliance state")
    agents.add_argument("--selector", help="only agents whose labels match k=v[,k=v...]")
    agents.add_argument("--hold", metavar="HOLD_ID", help="only agents in this hold's scope")
    agents.add_argument("--json", action="store_true")

    ack = operator_command(
        "ack-violation",
        "acknowledge an agent's VIOLATION after investigating it",
        cmd_ack_violation,
    )
    ack.add_argument("agent_id", metavar="AGENT_ID")
    ack.add_argument("--note", required=True, help="what was found and what was done")

    inventory = sub.add_parser("inventory", help="the expected fleet")
    inventory_sub = inventory.add_subparsers(dest="inventory_command", required=True)
    imp = inventory_sub.add_parser("import", help="register expected agents from a CSV file")
    imp.add_argument("file", help="CSV with an agent_id column; other columns become labels")
    imp.add_argument("--server", default=os.environ.get("KILLSWITCH_SERVER", DEFAULT_SERVER))
    imp.set_defaults(handler=cmd_inventory_import)
    return parser


def fail(message: str, exit_code: int) -> NoReturn:
    sys.stderr.write(f"killswitch: error: {message}\n")
    sys.exit(exit_code)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.handler is None:
            sys.exit(cmd_serve(args))
        sys.exit(args.handler(args, OperatorClient(args.server)))
    except CliError as exc:
        fail(str(exc), exc.exit_code)
    except InvalidInput as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    except KillswitchError as exc:
        fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except BrokenPipeError:
        sys.exit(EXIT_FAILED)
