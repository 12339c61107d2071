"""``killswitch``: run the control server, and operate it during an incident.

Exit codes: 0 success; 1 refused or failed; 2 bad input; 3 ``--wait`` timed out;
4 the control server could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from control.cli_serve import (
    add_enrolment_limit_options,
    add_serve_web_and_audit_options,
    add_webhook_options,
    oidc_settings,
)
from control.domain import (
    ComplianceState,
    parse_label_pairs,
    parse_selector,
    validate_agent_id,
    validate_reason,
)
from control.domain.audit import (
    GENESIS_HASH,
    AuditEntry,
    AuditRecord,
    ChainHead,
    verify_anchor,
    verify_chain,
)
from control.domain.history import DEFAULT_HISTORY_RETENTION_SECONDS, check_history_retention
from control.domain.labels import label_mismatch, mismatch_json
from control.errors import STORE_UNAVAILABLE_METADATA, InvalidInput, KillswitchError
from control.ingest.cli import add_ingest_parser
from control.pki import load_identity
from control.rpc.authz import INSECURE_IDENTITY_METADATA

DEFAULT_SERVER = "127.0.0.1:50051"
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_TIMEOUT, EXIT_UNREACHABLE = 1, 2, 3, 4
# The server answered, but its store cannot write (or be reached) now: nothing was done.
EXIT_STORE_UNAVAILABLE = 5
RPC_TIMEOUT_SECONDS = 15.0
INVENTORY_BATCH = 500
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
        "events_accepted_after_pause": agent.events_accepted_after_pause,
        "last_accepted_event_at": iso(agent.last_accepted_event_at),
        "reported_labels": dict(sorted(agent.reported_labels.items())),
        "label_mismatch": mismatch_json(agent.labels, agent.reported_labels),
    }


def mismatch_cell(agent: pb.AgentRecord) -> str:
    """``org=marketing (server: finance)``: what the agent claims that the server denies."""
    mismatch = label_mismatch(agent.labels, agent.reported_labels)
    return ",".join(
        f"{key}={reported} (server: {server or 'none'})"
        for key, (server, reported) in mismatch.items()
    )


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """To ``sys.stdout`` as it is now, not at import: ``pause -q --wait`` redirects it to stderr."""
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        sys.stdout.write(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        )
        sys.stdout.write("\n")


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
        "REFUSED",
        "AFTER PAUSE",
        "LAST ACCEPTED",
        "LABEL MISMATCH",
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
                str(a.uploads_refused),
                str(a.events_accepted_after_pause),
                ago(a.last_accepted_event_at),
                mismatch_cell(a) or "-",
                a.reason,
            ]
        )
    return rows


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


# ------------------------------------------------------------------ gRPC client


@dataclass(frozen=True, slots=True)
class Credentials:
    """How the CLI proves who it is: an identity directory, or an insecure claim."""

    identity_dir: Path | None = None
    insecure_claim: str = ""


def credentials_from_args(args: argparse.Namespace) -> Credentials:
    if args.insecure:
        if not args.as_identity:
            raise CliError(
                "--insecure needs --as NAME:ROLE (or KILLSWITCH_AS): who you claim to be",
                EXIT_BAD_INPUT,
            )
        return Credentials(insecure_claim=args.as_identity)
    if not args.identity:
        raise CliError(
            "no identity: pass --identity DIR or set KILLSWITCH_IDENTITY"
            " (`killswitch identity request`, then an administrator's `certs issue`)",
            EXIT_BAD_INPUT,
        )
    return Credentials(identity_dir=Path(args.identity))


class OperatorClient:
    def __init__(self, address: str, credentials: Credentials) -> None:
        self.address = address
        self._metadata: tuple[tuple[str, str], ...] = ()
        if credentials.identity_dir is None:
            self._channel = grpc.insecure_channel(address)
            self._metadata = ((INSECURE_IDENTITY_METADATA, credentials.insecure_claim),)
        else:
            try:
                identity = load_identity(credentials.identity_dir)
            except KillswitchError as exc:
                raise CliError(f"bad --identity: {exc}", EXIT_BAD_INPUT) from None
            self._channel = grpc.secure_channel(
                address,
                grpc.ssl_channel_credentials(
                    root_certificates=identity.ca_pem,
                    private_key=identity.key_pem,
                    certificate_chain=identity.cert_pem,
                ),
            )
        self._stubs: dict[str, Any] = {
            "Operator": pb_grpc.OperatorStub(self._channel),
            "SelfService": pb_grpc.SelfServiceStub(self._channel),
            "Dashboard": pb_grpc.DashboardStub(self._channel),
            "Runbooks": pb_grpc.RunbooksStub(self._channel),
            "Reports": pb_grpc.ReportsStub(self._channel),
        }

    def _method(self, method: str) -> Any:
        service, _, name = method.rpartition(".")
        return getattr(self._stubs[service or "Operator"], name)

    def call(self, method: str, request: Any) -> Any:
        try:
            return self._method(method)(
                request, timeout=RPC_TIMEOUT_SECONDS, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def stream(self, method: str, request: Any) -> Iterator[Any]:
        try:
            yield from self._method(method)(
                request, timeout=RPC_TIMEOUT_SECONDS * 4, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def _error(self, exc: grpc.RpcError) -> CliError:
        code: grpc.StatusCode = exc.code()
        details: str = exc.details() or code.name.lower()
        if code is grpc.StatusCode.UNAVAILABLE and _from_store(exc):
            return CliError(
                f"the control server at {self.address} cannot do this now: {details}",
                EXIT_STORE_UNAVAILABLE,
            )
        if code is grpc.StatusCode.UNAVAILABLE:
            hint = (
                " (TLS handshake failed: is the identity from this server's CA, unexpired and"
                " not revoked?)"
                if "handshake" in details.lower() or "ssl" in details.lower()
                else ""
            )
            return CliError(
                f"cannot reach the control server at {self.address}"
                f" ({details.splitlines()[0]}){hint}; is `killswitch serve` running?"
                " Set --server or KILLSWITCH_SERVER",
                EXIT_UNREACHABLE,
            )
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return CliError(
                f"the control server at {self.address} did not answer in time", EXIT_UNREACHABLE
            )
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            return CliError(details, EXIT_BAD_INPUT)
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            return CliError(f"permission denied: {details}")
        return CliError(details)


def _from_store(exc: grpc.RpcError) -> bool:
    """Whether the server itself refused because of its store (not a transport failure)."""
    trailing = getattr(exc, "trailing_metadata", lambda: None)() or ()
    return any(key == STORE_UNAVAILABLE_METADATA for key, _ in trailing)


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
    if args.quiet:
        print(hold.id)
    else:
        print(
            f"hold {hold.id} created at epoch {response.epoch}: pauses {scope_text(hold.scope)}"
            f" ({response.covered_agents} known agents)"
        )
    if not args.wait:
        return 0
    with contextlib.redirect_stdout(sys.stderr if args.quiet else sys.stdout):
        return wait_until_settled(client, hold.id, args.timeout, verb="stopped")


def cmd_resume(args: argparse.Namespace, client: OperatorClient) -> int:
    """Resuming needs a second person: this opens a request an approver decides."""
    response = client.call(
        "RequestResume",
        pb.RequestResumeRequest(
            hold_id=args.hold,
            reason=validate_reason(args.reason),
            ticket=args.ticket,
            expires_in_seconds=args.expires_in or 0.0,
            for_runbook=args.for_runbook,
        ),
    )
    request = response.request
    if args.quiet:
        print(request.id)
    else:
        print(
            f"resume request {request.id} opened for hold {request.hold_id}"
            f" (expires {iso(request.expires_at)});"
            f" a different approver must run: killswitch approve {request.id}"
        )
    if not args.wait:
        return 0
    with contextlib.redirect_stdout(sys.stderr if args.quiet else sys.stdout):
        outcome = wait_for_decision(client, request.id, args.timeout)
        if outcome is None:
            return EXIT_TIMEOUT
        if outcome.state != pb.RESUME_STATE_EXECUTED:
            print(f"resume request {outcome.id} was {resume_state_name(outcome.state)}")
            return EXIT_FAILED
        return wait_until_settled(client, request.hold_id, args.timeout, verb="settled")


def fetch_request(client: OperatorClient, request_id: str) -> pb.ResumeRequest:
    (request,) = client.call(
        "ListResumeRequests", pb.ListResumeRequestsRequest(request_id=request_id)
    ).requests
    found: pb.ResumeRequest = request
    return found


def resume_state_name(state: int) -> str:
    return pb.ResumeState.Name(state).removeprefix("RESUME_STATE_").lower()  # type: ignore[arg-type]


def wait_for_decision(
    client: OperatorClient, request_id: str, timeout: float
) -> pb.ResumeRequest | None:
    deadline = time.monotonic() + timeout
    sys.stderr.write(f"waiting for an approver to decide {request_id} ...\n")
    while True:
        request = fetch_request(client, request_id)
        if request.state != pb.RESUME_STATE_PENDING:
            return request
        if time.monotonic() >= deadline:
            print(f"timed out after {timeout:g}s: {request_id} is still pending")
            return None
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def request_json(request: pb.ResumeRequest) -> dict[str, Any]:
    return {
        "id": request.id,
        "hold_id": request.hold_id,
        "state": resume_state_name(request.state),
        "requested_by": request.requested_by,
        "reason": request.reason,
        "ticket": request.ticket,
        "for_runbook": request.for_runbook,
        "revision": request.revision,
        "created_at": iso(request.created_at),
        "expires_at": iso(request.expires_at),
        "approvals": [
            {"approver": a.approver, "at": iso(a.at), "revision": a.revision, "note": a.note}
            for a in request.approvals
        ],
        "decided_by": request.decided_by,
        "decision_note": request.decision_note,
        "lifted_epoch": request.lifted_epoch,
        "drill_runbook": request.drill_runbook,
        "drill_sha256": request.drill_sha256,
    }


def request_subject(request: pb.ResumeRequest) -> str:
    """What a request asks for: to resume a hold, or to start a drill's exact text."""
    if request.drill_sha256:
        return f"start drill {request.drill_runbook!r} (sha256 {request.drill_sha256[:12]})"
    return f"resume hold {request.hold_id}"


def cmd_requests_list(args: argparse.Namespace, client: OperatorClient) -> int:
    requests = client.call(
        "ListResumeRequests", pb.ListResumeRequestsRequest(include_closed=args.all)
    ).requests
    if args.json:
        print_json([request_json(r) for r in requests])
        return 0
    if not requests:
        print("no open resume requests" + ("" if args.all else " (--all shows closed ones)"))
        return 0
    rows = [["REQUEST", "HOLD", "STATE", "BY", "REV", "REASON", "EXPIRES"]]
    for r in requests:
        rows.append(
            [
                r.id,
                f"drill {r.drill_runbook}" if r.drill_sha256 else r.hold_id,
                resume_state_name(r.state),
                r.requested_by,
                str(r.revision),
                r.reason,
                iso(r.expires_at) or "-",
            ]
        )
    print_table(rows)
    return 0


def cmd_requests_edit(args: argparse.Namespace, client: OperatorClient) -> int:
    response = client.call(
        "EditResumeRequest",
        pb.EditResumeRequestRequest(
            request_id=args.request_id, reason=args.reason or "", ticket=args.ticket or ""
        ),
    )
    request = response.request
    print(
        f"resume request {request.id} is now revision {request.revision};"
        " any approvals were dropped and it needs a fresh approval"
    )
    return 0


def _decide(args: argparse.Namespace, client: OperatorClient, method: str) -> pb.ResumeRequest:
    """Show what is being decided, and pin the revision so a later edit is not approved blind."""
    request = fetch_request(client, args.request_id)
    print(
        f"{request.id}: {request_subject(request)}, asked by {request.requested_by}:"
        f" {request.reason} (revision {request.revision})"
    )
    response = client.call(
        method,
        pb.DecideResumeRequest(
            request_id=request.id, revision=request.revision, note=args.note or ""
        ),
    )
    decided: pb.ResumeRequest = response.request
    return decided


def cmd_approve(args: argparse.Namespace, client: OperatorClient) -> int:
    request = _decide(args, client, "ApproveResume")
    if request.drill_sha256:
        print(f"approved {request.id}: `runbook start FILE --approval {request.id}` may now run it")
    elif request.for_runbook:
        print(f"approved {request.id}: a runbook may now re-enable hold {request.hold_id}")
    else:
        print(
            f"approved {request.id}: hold {request.hold_id} lifted at epoch {request.lifted_epoch}"
        )
    return 0


def cmd_deny(args: argparse.Namespace, client: OperatorClient) -> int:
    request = _decide(args, client, "DenyResume")
    print(f"denied {request.id}: no {request_subject(request)}")
    return 0


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
    added = known = relabelled = 0
    # Batches keep every message well under the server's size cap.
    for start in range(0, len(agents), INVENTORY_BATCH):
        batch = agents[start : start + INVENTORY_BATCH]
        response = client.call("ExpectAgents", pb.ExpectAgentsRequest(agents=batch))
        added, known = added + response.added, known + response.already_known
        relabelled += response.relabelled
    print(f"{added} agents added to the inventory, {known} already known ({relabelled} relabelled)")
    return 0


# ------------------------------------------------------------------ audit


def audit_entry_from_pb(entry: pb.AuditEntry) -> AuditEntry:
    record = AuditRecord(
        at=entry.at.ToNanoseconds() / 1e9,
        actor=entry.actor,
        role=entry.role,
        action=entry.action,
        target=entry.target,
        reason=entry.reason,
        ticket=entry.ticket,
        result=entry.result,
        detail=entry.detail,
    )
    return AuditEntry(entry.seq, record, entry.prev_hash, entry.hash)


def audit_from_server(client: OperatorClient) -> tuple[list[AuditEntry], ChainHead]:
    entries: list[AuditEntry] = []
    head = ChainHead(0, GENESIS_HASH)
    while True:
        after = entries[-1].seq if entries else 0
        page = client.call("ListAudit", pb.ListAuditRequest(after_seq=after))
        head = ChainHead(page.head_seq, page.head_hash)
        entries.extend(audit_entry_from_pb(e) for e in page.entries)
        if not page.entries:
            return entries, head


def audit_from_file(data_dir: Path, database: str) -> tuple[list[AuditEntry], ChainHead]:
    """Read the database directly: verification must not depend on the server's honesty."""
    from control.store import open_store

    async def read() -> tuple[list[AuditEntry], ChainHead]:
        if not database and not (data_dir / "killswitch.db").exists():
            raise InvalidInput(f"no database in {data_dir}")
        store = await open_store(data_dir, database)
        try:
            entries: list[AuditEntry] = []
            while True:
                page, head = await store.read_audit(entries[-1].seq if entries else 0, 1000)
                if not page:
                    return entries, head
                entries.extend(page)
        finally:
            await store.close()

    return asyncio.run(read())


def parse_anchor(text: str) -> ChainHead:
    seq, _, digest = text.partition(":")
    if not seq.isdigit() or len(digest) != 64:
        raise InvalidInput(
            f"bad --anchor {text!r}: expected SEQ:SHA256HEX, as `audit verify` prints"
        )
    return ChainHead(int(seq), digest.lower())


def audit_json(entry: AuditEntry) -> dict[str, Any]:
    r = entry.record
    return {
        "seq": entry.seq,
        "at": datetime.fromtimestamp(r.at, UTC).isoformat(timespec="milliseconds"),
        "actor": r.actor,
        "role": r.role,
        "action": r.action,
        "target": r.target,
        "reason": r.reason,
        "ticket": r.ticket,
        "result": r.result,
        "detail": r.detail,
        "prev_hash": entry.prev_hash,
        "hash": entry.hash,
    }


def cmd_audit(args: argparse.Namespace, client: OperatorClient) -> int:
    entries, _ = audit_from_server(client)
    if args.json:
        print_json([audit_json(e) for e in entries])
        return 0
    rows = [["SEQ", "AT", "ACTOR", "ROLE", "ACTION", "TARGET", "RESULT", "REASON"]]
    for e in entries:
        r = e.record
        at = datetime.fromtimestamp(r.at, UTC).isoformat(timespec="seconds")
        rows.append([str(e.seq), at, r.actor, r.role, r.action, r.target, r.result, r.reason])
    print_table(rows)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    if args.data_dir or args.database:
        entries, head = audit_from_file(Path(args.data_dir or "."), args.database)
    else:
        entries, head = audit_from_server(OperatorClient(args.server, credentials_from_args(args)))
    problem: object = verify_chain(entries, head)
    if problem is None and args.anchor:
        problem = verify_anchor(entries, parse_anchor(args.anchor))
    if problem is None and args.checkpoints:
        from control import audit_checkpoints

        ca_pem = audit_checkpoints.ca_for_verify(args.data_dir, args.identity)
        problem = audit_checkpoints.problem_with(entries, Path(args.checkpoints), ca_pem)
    if problem is not None:
        print(f"TAMPERED: {problem}")
        return EXIT_FAILED
    last = entries[-1] if entries else None
    print(
        f"audit log intact: {len(entries)} entries"
        + (
            f"; head {last.seq}:{last.hash} (keep it to check against later with --anchor)"
            if last
            else ""
        )
    )
    return 0


# ------------------------------------------------------------------ enrolment and certificates


def cmd_enroll_token_create(args: argparse.Namespace, client: OperatorClient) -> int:
    response = client.call(
        "CreateEnrollToken",
        pb.CreateEnrollTokenRequest(
            uses=args.uses, ttl_seconds=args.ttl, labels=parse_label_pairs(args.label)
        ),
    )
    sys.stderr.write(
        f"token {response.token_id}: {response.uses} uses, expires {iso(response.expires_at)};"
        " it is shown once\n"
    )
    print(response.token)
    return 0


def cert_json(cert: pb.Certificate) -> dict[str, Any]:
    return {
        "serial": cert.serial,
        "subject": cert.subject,
        "role": cert.role,
        "issued_at": iso(cert.issued_at),
        "not_after": iso(cert.not_after),
        "revoked_at": iso(cert.revoked_at),
    }


def cmd_certs_list(args: argparse.Namespace, client: OperatorClient) -> int:
    certs = client.call("ListCertificates", pb.ListCertificatesRequest()).certificates
    if args.json:
        print_json([cert_json(c) for c in certs])
        return 0
    rows = [["SERIAL", "SUBJECT", "ROLE", "EXPIRES", "REVOKED"]]
    for c in certs:
        rows.append(
            [c.serial, c.subject, c.role, iso(c.not_after) or "-", iso(c.revoked_at) or "-"]
        )
    print_table(rows)
    return 0


def cmd_certs_revoke(args: argparse.Namespace, client: OperatorClient) -> int:
    response = client.call(
        "RevokeCertificates",
        pb.RevokeCertificatesRequest(subject_or_serial=args.id, reason=args.reason or ""),
    )
    for cert in response.revoked:
        print(f"revoked {cert.serial} ({cert.subject}, {cert.role})")
    closed = response.streams_closed
    print(f"{len(response.revoked)} certificates revoked, {closed} live streams closed")
    return 0


# ------------------------------------------------------------------ employee self service


def cmd_me(args: argparse.Namespace, client: OperatorClient) -> int:
    laptops = client.call("SelfService.ListMyLaptops", pb.ListMyLaptopsRequest()).laptops
    if args.json:
        print_json(
            [
                {
                    "agent_id": laptop.agent_id,
                    "mode": mode_name(laptop.mode),
                    "state": laptop.state,
                    "connected": laptop.connected,
                    "last_seen": iso(laptop.last_seen),
                    "opted_out": laptop.opted_out,
                    "holds": [
                        {
                            "kind": pb.HoldKind.Name(h.kind).removeprefix("HOLD_KIND_").lower(),
                            "reason": h.reason,
                        }
                        for h in laptop.holds
                    ],
                }
                for laptop in laptops
            ]
        )
        return 0
    if not laptops:
        print("no laptop is registered to you (label owner=<your name>)")
        return 0
    for laptop in laptops:
        capture = "OFF" if laptop.mode == pb.MODE_PAUSED else "allowed"
        print(
            f"{laptop.agent_id}: capture {capture} ({laptop.state})"
            + (", opted out" if laptop.opted_out else "")
        )
        for hold in laptop.holds:
            print(f"  paused because: {hold.reason}")
    return 0


def cmd_opt_out(args: argparse.Namespace, client: OperatorClient) -> int:
    response = client.call(
        "SelfService.OptOut", pb.OptOutRequest(agent_id=args.agent_id, reason=args.reason or "")
    )
    print(
        f"{args.agent_id} opted out (hold {response.hold.id}, epoch {response.epoch});"
        " only you can opt back in"
    )
    return 0


def cmd_opt_in(args: argparse.Namespace, client: OperatorClient) -> int:
    response = client.call("SelfService.OptIn", pb.OptInRequest(agent_id=args.agent_id))
    print(
        f"{args.agent_id} opted back in (hold {response.hold.id} lifted at epoch {response.epoch});"
        " other holds may still pause it"
    )
    return 0


def cmd_dashboard(args: argparse.Namespace, client: OperatorClient) -> int:
    """A one-time login link for the web dashboard, in this identity's name and role."""
    response = client.call("Dashboard.CreateSession", pb.CreateDashboardSessionRequest())
    print(response.login_url)
    sys.stderr.write(
        f"open this link in a browser before {iso(response.expires_at)}; it works once."
        " Your session lasts 12 hours or until you log out.\n"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from control import cli_readiness
    from control.logs import configure_logging
    from control.server import ServerConfig, serve

    # Everything the server writes (database, WAL, logs it creates) is owner-only.
    os.umask(0o077)
    configure_logging(args.log_format, args.log_level)
    config = ServerConfig(
        data_dir=Path(args.data_dir),
        grpc_address=args.grpc,
        http_address=args.http,
        enroll_address=args.enroll or "",
        insecure=args.insecure,
        ack_deadline=args.ack_deadline,
        heartbeat_interval=args.heartbeat,
        lease_ttl=args.lease_ttl,
        prometheus=tuple(args.prometheus),
        runbook_tick=args.runbook_tick,
        database=args.database,
        history_retention=args.history_retention,
        public_url=args.public_url,
        metrics_address=args.metrics_listen,
        audit_checkpoints=args.audit_checkpoints,
        audit_checkpoint_interval=args.audit_checkpoint_interval,
        audit_syslog=args.audit_syslog,
        **cli_readiness.serve_settings(args),
        oidc=oidc_settings(args),
        webhooks=tuple(args.webhook),
        webhook_secret_file=args.webhook_secret_file,
        enrol_rate=args.enrol_rate,
        enrol_burst=args.enrol_burst,
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


def prometheus_source(text: str) -> tuple[str, str]:
    from control.prometheus_sources import parse_source  # aiohttp: only `serve` needs it

    try:
        return parse_source(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def history_retention(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    try:
        return check_history_retention(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} {exc}") from None


def add_wait_options(parser: argparse.ArgumentParser, until: str) -> None:
    parser.add_argument("--wait", action="store_true", help=f"wait {until}")
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=300.0,
        help="seconds to wait with --wait, then exit 3 (default 300)",
    )


def add_database_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--database",
        default=os.environ.get("KILLSWITCH_DATABASE", ""),
        metavar="URL",
        help=f"postgresql://USER@HOST:PORT/DB: {what} (env KILLSWITCH_DATABASE;"
        " default SQLite in the data dir)",
    )


def add_quiet_option(parser: argparse.ArgumentParser, prints: str) -> None:
    """For scripts and runbooks: ``HOLD=$(killswitch pause ... -q)``."""
    parser.add_argument(
        "-q", "--quiet", action="store_true", help=f"print only {prints} (reports go to stderr)"
    )


def add_client_options(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--server",
        default=env("KILLSWITCH_SERVER", DEFAULT_SERVER),
        help="control server HOST:PORT (env KILLSWITCH_SERVER; default %(default)s)",
    )
    parser.add_argument(
        "--identity",
        default=env("KILLSWITCH_IDENTITY", ""),
        metavar="DIR",
        help="your identity directory: cert.pem, key.pem, ca.pem (env KILLSWITCH_IDENTITY)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="talk to a `serve --insecure` development server, without TLS",
    )
    parser.add_argument(
        "--as",
        dest="as_identity",
        default=env("KILLSWITCH_AS", ""),
        metavar="NAME:ROLE",
        help="with --insecure only: the identity you claim (env KILLSWITCH_AS)",
    )


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of at least 1")
    return int(text)


class OneLineErrors(argparse.ArgumentParser):
    """Usage mistakes are one line too, like every other error (``--help`` has the rest)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see `{self.prog} --help`)", EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    # Their modules import this one: imported here, once it is loaded.
    from control import cli_readiness, cli_report, cli_runbook

    parser = OneLineErrors(
        prog="killswitch", description="Pause capture across the fleet and prove it stopped."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        parent: Any, name: str, help_text: str, handler: Callable[..., int]
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text)
        add_client_options(p)
        p.set_defaults(handler=handler, local=False)
        return p

    def group(name: str, help_text: str) -> Any:
        p = sub.add_parser(name, help=help_text, description=help_text)
        return p.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")

    add_ingest_parser(sub)
    serve = sub.add_parser("serve", help="run the control server")
    serve.add_argument("--data-dir", required=True, help="directory for the SQLite state and CA")
    add_database_option(serve, "the state; every replica of one fleet names the same one")
    serve.add_argument("--grpc", default="127.0.0.1:50051", help="gRPC listen address (mTLS)")
    serve.add_argument("--http", default="127.0.0.1:8080", help="HTTP listen address (probes)")
    serve.add_argument(
        "--enroll", help="agent enrolment listen address (TLS; default: the gRPC port + 1)"
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and claimed identities: development only, loopback only",
    )
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
    serve.add_argument(
        "--prometheus",
        type=prometheus_source,
        action="append",
        default=[],
        metavar="NAME=URL",
        help="a Prometheus runbook gates may query, by NAME (repeatable); runbooks name no URL",
    )
    serve.add_argument(
        "--runbook-tick",
        type=positive_seconds,
        default=1.0,
        help="how often active runbook runs evaluate their gates (default 1)",
    )
    serve.add_argument(
        "--history-retention",
        type=history_retention,
        default=DEFAULT_HISTORY_RETENTION_SECONDS,
        metavar="SECONDS",
        help="archive lifted holds, decided resume requests and ended runbook runs this"
        " long after they finished; the audit log keeps everything"
        f" (default {DEFAULT_HISTORY_RETENTION_SECONDS:.0f}: 7 days)",
    )
    add_serve_web_and_audit_options(serve, positive_seconds)
    add_enrolment_limit_options(serve, positive_seconds, positive_int)
    cli_readiness.add_serve_options(serve)
    add_webhook_options(serve)
    serve.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    serve.set_defaults(handler=cmd_serve, local=True)

    pause = command(sub, "pause", "pause capture on a scope (adds a hold)", cmd_pause)
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
    add_quiet_option(pause, "the new hold's id")

    resume = command(sub, "resume", "ask to lift a hold; a different approver decides", cmd_resume)
    resume.add_argument("--hold", required=True, metavar="HOLD_ID")
    resume.add_argument("--reason", required=True, help="why capture may come back")
    resume.add_argument("--ticket", default="", help="incident ticket reference")
    resume.add_argument(
        "--expires-in", type=positive_seconds, metavar="SECONDS", help="default 3600"
    )
    resume.add_argument(
        "--for-runbook",
        action="store_true",
        help="the approval lets a runbook re-enable the hold in waves instead of at once",
    )
    add_wait_options(resume, "for the decision, then until every agent in scope settled")
    add_quiet_option(resume, "the new request's id")

    for name, verb, handler in (
        ("approve", "approve", cmd_approve),
        ("deny", "deny", cmd_deny),
    ):
        decide = command(sub, name, f"{verb} a resume request (approvers only)", handler)
        decide.add_argument("request_id", metavar="REQUEST_ID")
        decide.add_argument("--note", required=name == "deny", help="why")

    requests = group("requests", "resume requests")
    listing = command(requests, "list", "open resume requests", cmd_requests_list)
    listing.add_argument("--all", action="store_true", help="closed ones too")
    listing.add_argument("--json", action="store_true")
    edit = command(
        requests,
        "edit",
        "change your request; approvals given so far are dropped",
        cmd_requests_edit,
    )
    edit.add_argument("request_id", metavar="REQUEST_ID")
    edit.add_argument("--reason")
    edit.add_argument("--ticket")

    cli_report.add_commands(sub, command)

    cli_runbook.add_commands(
        group("runbook", "gradual, gated re-enable of capture in waves"), command
    )
    cli_readiness.add_command(sub, command)

    holds = command(sub, "holds", "list the active holds", cmd_holds)
    holds.add_argument("--json", action="store_true")

    status = command(sub, "status", "fleet compliance summary", cmd_status)
    status.add_argument("--json", action="store_true")

    agents = command(sub, "agents", "one row per agent", cmd_agents)
    agents.add_argument("--state", help="only agents in this compliance state")
    agents.add_argument("--selector", help="only agents whose labels match k=v[,k=v...]")
    agents.add_argument("--hold", metavar="HOLD_ID", help="only agents in this hold's scope")
    agents.add_argument("--json", action="store_true")
    add_quiet_option(agents, "agent ids, one per line")

    ack = command(
        sub,
        "ack-violation",
        "acknowledge an agent's VIOLATION after investigating it",
        cmd_ack_violation,
    )
    ack.add_argument("agent_id", metavar="AGENT_ID")
    ack.add_argument("--note", required=True, help="what was found and what was done")

    inventory = group("inventory", "the expected fleet")
    imp = command(
        inventory, "import", "register expected agents from a CSV file", cmd_inventory_import
    )
    imp.add_argument("file", help="CSV with an agent_id column; other columns become labels")

    audit = command(sub, "audit", "the tamper-evident audit log", cmd_audit)
    audit.add_argument("--json", action="store_true")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="COMMAND")
    verify = audit_sub.add_parser("verify", help="check the hash chain; names the first bad entry")
    add_client_options(verify)
    verify.add_argument(
        "--data-dir", help="read the database file directly instead of asking the server"
    )
    add_database_option(verify, "or read this PostgreSQL database directly")
    verify.add_argument(
        "--anchor", metavar="SEQ:HASH", help="a head recorded earlier (catches a cut-off log)"
    )
    verify.add_argument(
        "--checkpoints",
        metavar="PATH",
        help="the server's signed checkpoints (its --audit-checkpoints directory, or a file of"
        " its syslog lines): catches a cut-off or rewritten log",
    )
    verify.set_defaults(handler=cmd_audit_verify, local=True)

    tokens = group("enroll-token", "agent enrolment tokens")
    create = command(tokens, "create", "print a new join token", cmd_enroll_token_create)
    create.add_argument("--uses", type=positive_int, default=1, help="agents it may enrol")
    create.add_argument(
        "--ttl", type=positive_seconds, default=3600.0, help="seconds it is valid (default 3600)"
    )
    create.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="K=V",
        help="pin this label on every agent it enrols (repeatable); the agent cannot change it",
    )

    certs = group("certs", "issued certificates")
    certs_list = command(certs, "list", "every certificate the CA issued", cmd_certs_list)
    certs_list.add_argument("--json", action="store_true")
    revoke = command(
        certs, "revoke", "revoke by subject (agent id, operator) or serial", cmd_certs_revoke
    )
    revoke.add_argument("id", metavar="ID")
    revoke.add_argument("--reason")
    from control import cli_identity

    cli_identity.add_commands(sub, certs)

    me = command(sub, "me", "your own laptops: is capture off?", cmd_me)
    me.add_argument("--json", action="store_true")
    opt_out = command(sub, "opt-out", "stop capture on your laptop until you opt in", cmd_opt_out)
    opt_out.add_argument("agent_id", metavar="LAPTOP_ID")
    opt_out.add_argument("--reason")
    opt_in = command(sub, "opt-in", "lift your own opt-out", cmd_opt_in)
    opt_in.add_argument("agent_id", metavar="LAPTOP_ID")
    command(sub, "dashboard", "print a one-time login link for the web dashboard", cmd_dashboard)
    return parser


def fail(message: str, exit_code: int) -> NoReturn:
    sys.stderr.write(f"killswitch: error: {message}\n")
    sys.exit(exit_code)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.local:
            sys.exit(args.handler(args))
        sys.exit(args.handler(args, OperatorClient(args.server, credentials_from_args(args))))
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
