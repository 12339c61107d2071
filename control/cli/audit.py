"""``audit`` and ``audit verify``: read the tamper-evident log, and check its hash chain.

``verify`` asks the server, or with ``--data-dir``/``--database`` reads the database
itself (``control.admin``), so that a dishonest server cannot vouch for its own log.
"""

from __future__ import annotations

import argparse
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

from killswitch.v1 import killswitch_pb2 as pb

from control import admin
from control.cli.exit_codes import EXIT_FAILED
from control.cli.options import add_client_options
from control.cli.options import add_command
from control.cli.options import add_database_option
from control.cli.options import connect
from control.cli.output import print_json
from control.cli.output import print_table
from control.client import OperatorClient
from control.domain.audit import GENESIS_HASH
from control.domain.audit import AuditEntry
from control.domain.audit import AuditRecord
from control.domain.audit import ChainHead
from control.domain.audit import verify_anchor
from control.domain.audit import verify_chain
from control.errors import InvalidInput


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
        page = client.list_audit(pb.ListAuditRequest(after_seq=after))
        head = ChainHead(page.head_seq, page.head_hash)
        entries.extend(audit_entry_from_pb(e) for e in page.entries)
        if not page.entries:
            return entries, head


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
        entries, head = admin.read_audit_log(Path(args.data_dir or "."), args.database)
    else:
        entries, head = audit_from_server(connect(args))
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


def add_commands(sub: Any) -> None:
    audit = add_command(sub, "audit", "the tamper-evident audit log", cmd_audit)
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
