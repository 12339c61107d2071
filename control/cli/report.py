"""``killswitch report --hold ID --out DIR`` and ``killswitch report verify DIR``.

The server builds and signs the report (``Reports.GetReport``); this writes it as
``report.json`` (the signed record, for machines) and ``report.html`` (for people,
rendered from the same JSON), and checks a report offline against the fleet's CA.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from killswitch.v1 import killswitch_pb2 as pb

from control.audit_checkpoints import ca_for_verify
from control.cli.exit_codes import EXIT_FAILED
from control.cli.options import add_client_options
from control.cli.options import add_command
from control.client import OperatorClient
from control.errors import InvalidInput
from control.report.render_html import render
from control.report.signing import verify

JSON_FILE, HTML_FILE = "report.json", "report.html"


def cmd_report(args: argparse.Namespace, client: OperatorClient) -> int:
    if not (args.hold and args.out):
        raise InvalidInput("report needs --hold HOLD_ID and --out DIR (or: report verify DIR)")
    chunks = client.get_report(pb.GetReportRequest(hold_id=args.hold))
    data = b"".join(chunk.data for chunk in chunks)
    report = json.loads(data)["report"]
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / JSON_FILE).write_bytes(data)
        (out / HTML_FILE).write_text(render(report), encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"cannot write the report to {out}: {exc.strerror}") from None
    figures = report["figures"]
    print(
        f"wrote {out / JSON_FILE} (signed) and {out / HTML_FILE}: hold {report['hold']['id']},"
        f" {figures['laptops']} laptops, {figures['verified_percent']}% verified stopped,"
        f" {len(figures['never_reached'])} never reached"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    path = Path(args.dir) / JSON_FILE
    ca_pem = _ca(args)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
    try:
        document: Any = json.loads(text)
    except ValueError as exc:
        print(f"TAMPERED: {path} is not JSON any more ({exc})")
        return EXIT_FAILED
    verdict = verify(document, ca_pem)
    for problem in verdict.problems:
        print(f"TAMPERED: {problem}")
    if verdict.problems:
        return EXIT_FAILED
    print(verdict.summary)
    return 0


def _ca(args: argparse.Namespace) -> bytes:
    if not args.ca:
        return ca_for_verify(args.data_dir, args.identity)
    try:
        return Path(args.ca).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read the CA {args.ca}: {exc.strerror}") from None


def add_commands(sub: Any) -> None:
    report = add_command(
        sub, "report", "a signed proof report of one hold, as JSON and HTML", cmd_report
    )
    report.add_argument("--hold", metavar="HOLD_ID", help="the incident's hold")
    report.add_argument("--out", metavar="DIR", help=f"where to write {JSON_FILE} and {HTML_FILE}")
    verbs = report.add_subparsers(dest="report_command", metavar="COMMAND")
    check = verbs.add_parser(
        "verify",
        help="check a report offline against the fleet's CA; names any altered row",
        description="check a report offline against the fleet's CA; names any altered row",
    )
    add_client_options(check)
    check.add_argument("dir", metavar="DIR", help=f"the directory holding {JSON_FILE}")
    check.add_argument("--ca", metavar="FILE", help="the fleet's CA (default: your identity's)")
    check.add_argument("--data-dir", default="", help="or the server's data directory's CA")
    check.set_defaults(handler=cmd_verify, local=True)
