"""``killswitch runbook plan|request|start|status|list|advance|abort``: runbooks from the CLI.

The file is parsed here first, so a typo is reported with its file, line and field
before anything is sent; the server parses it again and keeps the text with the run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from killswitch.v1 import killswitch_pb2 as pb

from control.cli.exit_codes import EXIT_BAD_INPUT
from control.cli.exit_codes import EXIT_FAILED
from control.cli.exit_codes import EXIT_TIMEOUT
from control.cli.options import add_command
from control.cli.options import add_group
from control.cli.options import add_quiet_option
from control.cli.options import positive_seconds
from control.cli.output import print_json
from control.cli.output import print_table
from control.client import OperatorClient
from control.domain import validate_reason
from control.runbook_file import RunbookFileError
from control.runbook_file import load_runbook
from control.runbook_json import run_json
from control.wire import iso

POLL_SECONDS = 0.5
# States in which a run waits on nothing but time and its gates.
MOVING = frozenset({"running", "pausing"})
ENDED_BADLY = frozenset({"halted", "aborted"})


def duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h"] * bool(hours) + [f"{minutes}m"] * bool(minutes)
    return "".join(parts + [f"{secs}s"] * bool(secs or not parts))


def waves_text(count: int) -> str:
    return f"{count} wave" + ("" if count == 1 else "s")


def _source(path: str) -> pb.RunbookSource:
    _, text = load_runbook(Path(path))
    return pb.RunbookSource(file_name=path, text=text)


def print_run(run: pb.RunbookRun) -> None:
    print(f"run {run.id}  {run.runbook} ({run.file_name})  {run.state.upper()}")
    print(f"  started {iso(run.started_at)} by {run.started_by}; hold {run.hold_id or '-'}")
    if run.pause_time_to_compliance_seconds:
        print(f"  pause verified everywhere in {run.pause_time_to_compliance_seconds:.1f}s")
    rows = [["wave", "name", "target", "state", "capturing", "compliant in", "gates"]]
    for wave in run.waves:
        failing = [f"{g.name} {g.observed} (needs {g.limit})" for g in wave.gates if not g.passed]
        rows.append(
            [
                f"{wave.index + 1}/{len(run.waves)}",
                wave.name,
                wave.target,
                wave.state,
                f"{wave.capturing}/{wave.agents}" if wave.state != "pending" else "-",
                duration(wave.time_to_compliance_seconds)
                if wave.time_to_compliance_seconds
                else "-",
                "; ".join(failing) or ("ok" if wave.gates else "-"),
            ]
        )
    print_table(rows)
    if run.halt_reason:
        print(f"  {run.state}: {run.halt_reason}")
    if run.next_step:
        print(f"  next: {run.next_step}")


def cmd_check(args: argparse.Namespace) -> int:
    """Local: no server, no identity; for CI on a repository of runbooks."""
    failed = 0
    for path in args.files:
        try:
            book, _ = load_runbook(Path(path))
        except RunbookFileError as exc:
            print(f"{exc}", file=sys.stderr)
            failed += 1
            continue
        shares = ", ".join(w.describe() for w in book.waves)
        first = "pauses its scope, then " if book.pause is not None else ""
        print(f"{path}: ok: {book.name}, {first}{waves_text(len(book.waves))} ({shares})")
    return EXIT_BAD_INPUT if failed else 0


def cmd_plan(args: argparse.Namespace, client: OperatorClient) -> int:
    plan = client.plan_runbook(
        pb.PlanRunbookRequest(
            runbook=_source(args.file), hold_id=args.hold or "", approval_id=args.approval or ""
        ),
    )
    if args.json:
        print_json(
            {
                "runbook": plan.runbook,
                "hold_id": plan.hold_id,
                "scope": plan.scope,
                "pause_scope": plan.pause_scope,
                "min_duration_seconds": plan.min_duration_seconds,
                "waves": [
                    {
                        "index": w.index,
                        "name": w.name,
                        "target": w.target,
                        "agents": w.agents,
                        "sample_agent_ids": list(w.sample_agent_ids),
                        "held_back": w.held_back,
                        "soak_seconds": w.soak_seconds,
                        "starts_after_seconds": w.starts_after_seconds,
                        "confirm": w.confirm,
                    }
                    for w in plan.waves
                ],
            }
        )
        return 0
    what = f"hold {plan.hold_id} ({plan.scope})" if plan.hold_id else plan.scope
    if plan.pause_scope:
        what = f"{plan.pause_scope}, after pausing it first"
    print(
        f"runbook {plan.runbook}: re-enables {what} in {waves_text(len(plan.waves))},"
        f" at least {duration(plan.min_duration_seconds)} of soak"
    )
    rows = [["wave", "name", "target", "agents", "held back", "soak", "starts after", "confirm"]]
    rows += [
        [
            str(w.index + 1),
            w.name,
            w.target,
            str(w.agents),
            str(w.held_back),
            duration(w.soak_seconds),
            duration(w.starts_after_seconds),
            "yes" if w.confirm else "no",
        ]
        for w in plan.waves
    ]
    print_table(rows)
    held = sum(w.held_back for w in plan.waves)
    if held:
        print(f"{held} agents stay paused under other holds (opt-outs, other incidents)")
    return 0


def cmd_start(args: argparse.Namespace, client: OperatorClient) -> int:
    response = client.start_runbook(
        pb.StartRunbookRequest(runbook=_source(args.file), approval_id=args.approval or ""),
    )
    run = response.run
    if args.quiet:
        print(run.id)
        return 0
    if run.state == "pausing":
        print(f"started {run.id} ({run.runbook}): pausing with hold {run.hold_id} first")
    else:
        first = run.waves[0]
        print(
            f"started {run.id} ({run.runbook}): wave 1 of {len(run.waves)} re-enables"
            f" {first.target}; hold {run.lifted_hold_id} replaced by rollout hold {run.hold_id}"
        )
    print(f"follow it: killswitch runbook status {run.id} --wait")
    return 0


def cmd_request(args: argparse.Namespace, client: OperatorClient) -> int:
    """A drill pauses capture: without an incident commander it needs a second person."""
    response = client.request_drill(
        pb.RequestDrillRequest(
            runbook=_source(args.file),
            reason=validate_reason(args.reason),
            ticket=args.ticket,
            expires_in_seconds=args.expires_in or 0.0,
        ),
    )
    request = response.request
    if args.quiet:
        print(request.id)
        return 0
    print(
        f"drill request {request.id} opened for {request.drill_runbook!r}"
        f" (expires {iso(request.expires_at)}); a different approver must run:"
        f" killswitch approve {request.id}; then:"
        f" killswitch runbook start {args.file} --approval {request.id}"
    )
    return 0


def _fetch(client: OperatorClient, run_id: str) -> pb.RunbookRun:
    return client.get_runbook_run(pb.GetRunbookRunRequest(run_id=run_id)).run


def cmd_status(args: argparse.Namespace, client: OperatorClient) -> int:
    run = _fetch(client, args.run_id or "")
    if args.wait:
        deadline = time.monotonic() + args.timeout
        last = ""
        while run.state in MOVING:
            line = f"{run.id} {run.state}, wave {run.current_wave + 1}/{len(run.waves)}"
            if line != last:
                sys.stderr.write(line + "\n")
                last = line
            if time.monotonic() >= deadline:
                print(f"timed out after {args.timeout:g}s: {run.id} is still {run.state}")
                return EXIT_TIMEOUT
            time.sleep(POLL_SECONDS)
            run = _fetch(client, run.id)
    if args.json:
        print_json(run_json(run))
    else:
        print_run(run)
    return EXIT_FAILED if args.wait and run.state in ENDED_BADLY else 0


def cmd_list(args: argparse.Namespace, client: OperatorClient) -> int:
    runs = client.list_runbook_runs(pb.ListRunbookRunsRequest()).runs
    if args.json:
        print_json([run_json(r) for r in runs])
    elif not runs:
        print("no runbook has been run yet")
    else:
        rows = [["run", "runbook", "state", "wave", "started", "by"]]
        rows += [
            [
                r.id,
                r.runbook,
                r.state,
                f"{r.current_wave + 1}/{len(r.waves)}",
                iso(r.started_at) or "-",
                r.started_by,
            ]
            for r in runs
        ]
        print_table(rows)
    return 0


def cmd_advance(args: argparse.Namespace, client: OperatorClient) -> int:
    run = client.advance_runbook(
        pb.AdvanceRunbookRequest(run_id=args.run_id, approval_id=args.approval or ""),
    ).run
    wave = run.waves[run.current_wave]
    print(f"{run.id}: wave {run.current_wave + 1} of {len(run.waves)} started ({wave.target})")
    return 0


def cmd_abort(args: argparse.Namespace, client: OperatorClient) -> int:
    run = client.abort_runbook(
        pb.AbortRunbookRequest(run_id=args.run_id, reason=validate_reason(args.reason)),
    ).run
    repaused = sum(w.state == "repaused" for w in run.waves)
    print(f"{run.id} aborted; {repaused} enabled waves re-paused under hold {run.hold_id}")
    return 0


def add_commands(sub: Any) -> None:
    group = add_group(sub, "runbook", "gradual, gated re-enable of capture in waves")
    check = group.add_parser(
        "check",
        help="validate runbook files (local, no server)",
        description="validate runbook files (local, no server)",
    )
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(handler=cmd_check, local=True)

    plan = add_command(group, "plan", "dry run: which agents in which wave, and timing", cmd_plan)
    plan.add_argument("file", metavar="FILE")
    target = plan.add_mutually_exclusive_group()
    target.add_argument("--hold", metavar="HOLD_ID", help="the hold the waves would split")
    target.add_argument("--approval", metavar="REQUEST_ID", help="the request naming the hold")
    plan.add_argument("--json", action="store_true")

    request = add_command(
        group, "request", "ask to start a drill runbook; a different approver decides", cmd_request
    )
    request.add_argument("file", metavar="FILE")
    request.add_argument("--reason", required=True, help="why the drill runs now")
    request.add_argument("--ticket", default="", help="change or incident ticket reference")
    request.add_argument(
        "--expires-in", type=positive_seconds, metavar="SECONDS", help="default 3600"
    )
    add_quiet_option(request, "the new request's id")

    start = add_command(group, "start", "start a run (re-enables need an approval)", cmd_start)
    start.add_argument("file", metavar="FILE")
    start.add_argument(
        "--approval",
        metavar="REQUEST_ID",
        help="an approved `resume --for-runbook` request for the hold; for a drill started"
        " by anyone but an incident commander, an approved `runbook request`",
    )
    add_quiet_option(start, "the run id")

    status = add_command(group, "status", "a run's state, waves and gates", cmd_status)
    status.add_argument("run_id", nargs="?", metavar="RUN_ID", help="default: the newest run")
    status.add_argument("--json", action="store_true")
    status.add_argument(
        "--wait",
        action="store_true",
        help="until the run needs a human or ended (exit 1 if halted or aborted)",
    )
    status.add_argument(
        "--timeout", type=positive_seconds, default=3600.0, help="with --wait (default 3600)"
    )

    listing = add_command(group, "list", "every run, newest last", cmd_list)
    listing.add_argument("--json", action="store_true")

    advance = add_command(
        group, "advance", "confirm the next wave (or give a drill its approval)", cmd_advance
    )
    advance.add_argument("run_id", metavar="RUN_ID")
    advance.add_argument("--approval", metavar="REQUEST_ID", help="for a run awaiting approval")

    abort = add_command(group, "abort", "halt a run and re-pause every wave it enabled", cmd_abort)
    abort.add_argument("run_id", metavar="RUN_ID")
    abort.add_argument("--reason", required=True)
