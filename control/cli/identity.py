"""``killswitch init``, ``identity request`` and ``certs issue``: real people, real keys.

A person makes their own key and certificate request; the key never leaves their
directory. An administrator signs the request with the root CA key, offline, where
that key is kept (never on a replica), and the certificate is recorded in the
database so that ``certs list`` shows it and ``certs revoke NAME`` finds it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from control import admin
from control.cli.options import add_database_option
from control.domain.identity import parse_role
from control.errors import InvalidInput
from control.errors import KillswitchError
from control.pki import BOOTSTRAP_ADMIN
from control.pki import CSR_FILE
from control.pki import IDENTITIES_DIR
from control.pki import MAX_CSR_BYTES
from control.pki import PKI_DIR
from control.pki import REPLICA_FILES
from control.pki import RootAuthority
from control.pki import initialise
from control.pki import request_identity

# Who the audit log names for what is signed offline: no server call, no principal.
OFFLINE_ACTOR = "root CA (offline)"


def cmd_init(args: argparse.Namespace) -> int:
    """Create the CAs, the server certificate and the bootstrap admin identity."""
    os.umask(0o077)
    data_dir = Path(args.data_dir)
    record = initialise(data_dir, server_names=args.san or (), now=time.time())
    admin.record_certificate(data_dir, args.database, record, "killswitch init")
    pki = data_dir / PKI_DIR
    print(f"created the root CA, the agent CA and the server certificate in {pki}")
    print(f"  identity {data_dir / IDENTITIES_DIR / BOOTSTRAP_ADMIN}  (admin)")
    print(f"the root key {pki / 'ca-key.pem'} signs people: keep it off the servers")
    print(f"a replica needs only pki/{{{','.join(REPLICA_FILES)}}}")
    print(f"next: killswitch serve --data-dir {data_dir}")
    return 0


def cmd_identity_request(args: argparse.Namespace) -> int:
    """Make your own key and a request an administrator signs."""
    os.umask(0o077)
    out = Path(args.out)
    csr_pem = request_identity(out, args.name, parse_role(args.role))
    sys.stderr.write(
        f"your key is {out / 'key.pem'}: it stays here. Send {out / CSR_FILE} to an"
        f" administrator; save the certificate they return as {out / 'cert.pem'}"
        " and the CA's ca.pem beside it\n"
    )
    sys.stdout.write(csr_pem.decode())
    return 0


def cmd_certs_issue(args: argparse.Namespace) -> int:
    """Sign a person's request with the root key, offline, and record the certificate."""
    os.umask(0o077)
    data_dir = Path(args.data_dir)
    root = RootAuthority.load(data_dir)
    csr_pem = _read_csr(Path(args.csr))
    cert_pem, record = root.issue(
        csr_pem, parse_role(args.role), now=time.time(), server_names=args.san or ()
    )
    admin.record_certificate(data_dir, args.database, record, OFFLINE_ACTOR)
    sys.stderr.write(
        f"issued {record.subject} ({record.role.value}), serial {record.serial};"
        f" give them this certificate and {data_dir / PKI_DIR / 'ca.pem'}\n"
    )
    if args.out:
        try:
            Path(args.out).write_bytes(cert_pem)
        except OSError as exc:
            raise KillswitchError(f"cannot write {args.out}: {exc.strerror}") from None
    else:
        sys.stdout.write(cert_pem.decode())
    return 0


def _read_csr(path: Path) -> bytes:
    try:
        with path.open("rb") as csr:
            return csr.read(MAX_CSR_BYTES + 1)
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None


def add_commands(sub: Any, certs: Any) -> None:
    """``init`` and ``identity request`` under ``sub``; ``issue`` under ``certs``."""
    san_help = "another DNS name or IP the server is reached at (repeatable)"
    init = sub.add_parser("init", help="create the CAs, the server certificate and an admin")
    init.add_argument("--data-dir", required=True, help="the server's data directory")
    add_database_option(init, "where the issued certificates are recorded")
    init.add_argument("--san", action="append", metavar="NAME", help=san_help)
    init.set_defaults(handler=cmd_init, local=True)

    identity = sub.add_parser("identity", help="your own key and certificate request")
    identity_sub = identity.add_subparsers(
        dest="identity_command", required=True, metavar="COMMAND"
    )
    request = identity_sub.add_parser(
        "request", help="make your key and a CSR for an administrator to sign"
    )
    request.add_argument("--name", required=True, help="your name: the certificate's CN")
    request.add_argument("--role", required=True, help="the role you ask for")
    request.add_argument("--out", required=True, metavar="DIR", help="where your key stays")
    request.set_defaults(handler=cmd_identity_request, local=True)

    issue = certs.add_parser(
        "issue", help="sign a person's CSR with the root key (offline, where the key is)"
    )
    issue.add_argument("csr", metavar="CSR", help="the request file (`identity request` made)")
    issue.add_argument("--role", required=True, help="the role to grant; the CSR must ask for it")
    issue.add_argument(
        "--data-dir", required=True, help="the data dir holding pki/ca-key.pem (the root key)"
    )
    add_database_option(issue, "where the certificate is recorded")
    issue.add_argument("--out", metavar="FILE", help="write the certificate here (else stdout)")
    issue.add_argument(
        "--san",
        action="append",
        metavar="NAME",
        help="with --role ingest: a name the gateway serves agents under (repeatable)",
    )
    issue.set_defaults(handler=cmd_certs_issue, local=True)
