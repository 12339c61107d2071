"""``killswitch readiness``: which laptops would not honour a pause now, asked before one.

Also the ``serve`` options that set the readiness policy, kept here so the policy's
flags and its report live together.
"""

from __future__ import annotations

import argparse
from typing import Any

from killswitch.v1 import killswitch_pb2 as pb

from control.cli import EXIT_FAILED, OperatorClient, positive_seconds, print_json, print_table
from control.domain.readiness import (
    DEFAULT_MAX_CLOCK_SKEW_SECONDS,
    DEFAULT_OFFLINE_DAYS,
    parse_version,
)
from control.errors import InvalidInput, one_line


def cmd_readiness(args: argparse.Namespace, client: OperatorClient) -> int:
    report = client.call("Operator.GetReadiness", pb.GetReadinessRequest())
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


def agent_version(text: str) -> str:
    try:
        parse_version(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(one_line(exc)) from None
    return text


def add_command(sub: Any, command: Any) -> None:
    """Called by ``control.cli`` with its own helper, so the command shares the options."""
    readiness = command(
        sub,
        "readiness",
        "laptops that would not honour a pause now, by class; exit 1 if any cannot",
        cmd_readiness,
    )
    readiness.add_argument("--json", action="store_true")


def add_serve_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--min-agent-version",
        type=agent_version,
        metavar="VERSION",
        help="readiness: agents reporting an older version cannot honour a pause (e.g. 0.2.0)",
    )
    serve.add_argument(
        "--readiness-offline-days",
        type=positive_seconds,
        default=DEFAULT_OFFLINE_DAYS,
        metavar="DAYS",
        help="readiness: agents offline longer than this cannot honour a pause"
        f" (default {DEFAULT_OFFLINE_DAYS:g})",
    )
    serve.add_argument(
        "--max-clock-skew",
        type=positive_seconds,
        default=DEFAULT_MAX_CLOCK_SKEW_SECONDS,
        metavar="SECONDS",
        help="readiness: warn of agent clocks further off than this"
        f" (default {DEFAULT_MAX_CLOCK_SKEW_SECONDS:g})",
    )


def serve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``ServerConfig`` fields the options above set."""
    return {
        "min_agent_version": args.min_agent_version or "",
        "readiness_offline_days": args.readiness_offline_days,
        "max_clock_skew": args.max_clock_skew,
    }
