"""``enroll-token create``, ``certs list`` and ``certs revoke``: who may join the fleet and
who is in it. (``certs issue`` signs offline: ``control.cli.identity``.)"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from killswitch.v1 import killswitch_pb2 as pb

from control.cli.options import add_command
from control.cli.options import add_group
from control.cli.options import positive_int
from control.cli.options import positive_seconds
from control.cli.output import print_json
from control.cli.output import print_table
from control.client import OperatorClient
from control.domain import parse_label_pairs
from control.wire import iso


def cmd_enroll_token_create(args: argparse.Namespace, client: OperatorClient) -> int:
    response = client.create_enroll_token(
        pb.CreateEnrollTokenRequest(
            uses=args.uses, ttl_seconds=args.ttl, labels=parse_label_pairs(args.label)
        )
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
    certs = client.list_certificates(pb.ListCertificatesRequest()).certificates
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
    response = client.revoke_certificates(
        pb.RevokeCertificatesRequest(subject_or_serial=args.id, reason=args.reason or "")
    )
    for cert in response.revoked:
        print(f"revoked {cert.serial} ({cert.subject}, {cert.role})")
    closed = response.streams_closed
    print(f"{len(response.revoked)} certificates revoked, {closed} live streams closed")
    return 0


def add_commands(sub: Any) -> Any:
    """The commands under ``sub``; returns the ``certs`` group, which ``issue`` joins."""
    tokens = add_group(sub, "enroll-token", "agent enrolment tokens")
    create = add_command(tokens, "create", "print a new join token", cmd_enroll_token_create)
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

    certs = add_group(sub, "certs", "issued certificates")
    certs_list = add_command(certs, "list", "every certificate the CA issued", cmd_certs_list)
    certs_list.add_argument("--json", action="store_true")
    revoke = add_command(
        certs, "revoke", "revoke by subject (agent id, operator) or serial", cmd_certs_revoke
    )
    revoke.add_argument("id", metavar="ID")
    revoke.add_argument("--reason")
    return certs
