"""``pause``, ``resume``, ``approve``, ``deny`` and ``requests``: a hold's life in an incident.

Pausing is one person's call; resuming needs a second person, so ``resume`` opens a
request an approver decides. ``--wait`` follows the fleet until it obeyed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any

from killswitch.v1 import killswitch_pb2 as pb

from control.cli.exit_codes import EXIT_FAILED
from control.cli.exit_codes import EXIT_TIMEOUT
from control.cli.options import add_command
from control.cli.options import add_group
from control.cli.options import add_quiet_option
from control.cli.options import add_wait_options
from control.cli.options import positive_seconds
from control.cli.output import agent_rows
from control.cli.output import print_json
from control.cli.output import print_table
from control.cli.output import scope_text
from control.client import OperatorClient
from control.domain import parse_selector
from control.domain import validate_agent_id
from control.domain import validate_reason
from control.wire import iso

# Agents not yet settled that a timed-out ``--wait`` lists (``agents --hold`` shows all).
UNSETTLED_SHOWN = 50


def _scope_from_args(args: argparse.Namespace) -> pb.Scope:
    if args.all:
        return pb.Scope(all=True)
    if args.selector is not None:
        return pb.Scope(selector=pb.Selector(match_labels=parse_selector(args.selector)))
    return pb.Scope(agents=pb.AgentIds(ids=[validate_agent_id(a) for a in args.agent]))


def cmd_pause(args: argparse.Namespace, client: OperatorClient) -> int:
    scope = _scope_from_args(args)
    reason = validate_reason(args.reason)
    response = client.create_hold(
        pb.CreateHoldRequest(
            scope=scope, reason=reason, ticket=args.ticket, keep_spool=args.keep_spool
        )
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
    response = client.request_resume(
        pb.RequestResumeRequest(
            hold_id=args.hold,
            reason=validate_reason(args.reason),
            ticket=args.ticket,
            expires_in_seconds=args.expires_in or 0.0,
            for_runbook=args.for_runbook,
        )
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
    (request,) = client.list_resume_requests(
        pb.ListResumeRequestsRequest(request_id=request_id)
    ).requests
    return request


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


def wait_until_settled(client: OperatorClient, hold_id: str, timeout: float, *, verb: str) -> int:
    """Poll until every agent in the hold's scope reached its desired state."""
    deadline = time.monotonic() + timeout
    tty = sys.stderr.isatty()
    last_line = ""
    request = pb.GetStatusRequest(
        filter=pb.AgentFilter(hold_id=hold_id), unsettled_limit=UNSETTLED_SHOWN
    )
    while True:
        status = client.get_status(request)
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


# ------------------------------------------------------------------ deciding requests


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
    requests = client.list_resume_requests(
        pb.ListResumeRequestsRequest(include_closed=args.all)
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
    response = client.edit_resume_request(
        pb.EditResumeRequestRequest(
            request_id=args.request_id, reason=args.reason or "", ticket=args.ticket or ""
        )
    )
    request = response.request
    print(
        f"resume request {request.id} is now revision {request.revision};"
        " any approvals were dropped and it needs a fresh approval"
    )
    return 0


def _decision(args: argparse.Namespace, client: OperatorClient) -> pb.DecideResumeRequest:
    """Show what is being decided, and pin the revision so a later edit is not approved blind."""
    request = fetch_request(client, args.request_id)
    print(
        f"{request.id}: {request_subject(request)}, asked by {request.requested_by}:"
        f" {request.reason} (revision {request.revision})"
    )
    return pb.DecideResumeRequest(
        request_id=request.id, revision=request.revision, note=args.note or ""
    )


def cmd_approve(args: argparse.Namespace, client: OperatorClient) -> int:
    request = client.approve_resume(_decision(args, client)).request
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
    request = client.deny_resume(_decision(args, client)).request
    print(f"denied {request.id}: no {request_subject(request)}")
    return 0


# ------------------------------------------------------------------ the commands


def add_commands(sub: Any) -> None:
    pause = add_command(sub, "pause", "pause capture on a scope (adds a hold)", cmd_pause)
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

    resume = add_command(
        sub, "resume", "ask to lift a hold; a different approver decides", cmd_resume
    )
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
        decide = add_command(sub, name, f"{verb} a resume request (approvers only)", handler)
        decide.add_argument("request_id", metavar="REQUEST_ID")
        decide.add_argument("--note", required=name == "deny", help="why")

    requests = add_group(sub, "requests", "resume requests")
    listing = add_command(requests, "list", "open resume requests", cmd_requests_list)
    listing.add_argument("--all", action="store_true", help="closed ones too")
    listing.add_argument("--json", action="store_true")
    edit = add_command(
        requests,
        "edit",
        "change your request; approvals given so far are dropped",
        cmd_requests_edit,
    )
    edit.add_argument("request_id", metavar="REQUEST_ID")
    edit.add_argument("--reason")
    edit.add_argument("--ticket")
