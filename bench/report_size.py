"""Proof report: how long the server holds its event loop, and how large the files are.

The server builds a report on its event loop (the agents' views are live objects);
this times ``build`` + ``sign_report`` + the JSON encoding for a fleet of ``--laptops``
verified laptops and an audit log of ``--audit`` entries, with a real EC key, and
prints the size of report.json and of the rendered report.html.

Run: ``.venv/bin/python -m bench.report_size [--laptops 10000] [--audit 50000]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from control.domain import AgentStatus
from control.domain import Compliance
from control.domain import ComplianceState
from control.domain import Desired
from control.domain import Hold
from control.domain import HoldKind
from control.domain import Mode
from control.domain import Scope
from control.domain.audit import AuditEntry
from control.domain.audit import AuditRecord
from control.domain.audit import ChainHead
from control.domain.audit import chain
from control.pki import Authority
from control.pki import initialise
from control.plane import AgentView
from control.report.build import build
from control.report.render_html import render
from control.report.signing import sign_report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--laptops", type=int, default=10_000)
    parser.add_argument("--audit", type=int, default=50_000)
    args = parser.parse_args()
    now = time.time()
    hold = Hold(
        "hold-bench",
        HoldKind.INCIDENT,
        Scope.fleet(),
        "leak",
        "INC-1",
        "ic-1",
        now - 60,
        created_epoch=1,
    )
    desired = Desired(Mode.PAUSED, (hold.id,), "leak", 1, now - 60)
    views = [
        AgentView(
            f"laptop-{i:05d}",
            {"region": "eu-west", "owner": f"employee-{i}"},
            desired,
            AgentStatus(
                directive_sent_at=now - 60, acked_epoch=1, acked_mode=Mode.PAUSED,
                acked_at=now - 59, verified_at=now - 58 + i / args.laptops, lease_expires_at=now,
            ),
            Compliance(ComplianceState.VERIFIED_STOPPED, "counters frozen", now - 58),
        )
        for i in range(args.laptops)
    ]  # fmt: skip
    entries: list[AuditEntry] = []
    previous: AuditEntry | None = None
    for i in range(args.audit):
        target = f"{hold.id} incident all" if i == args.audit // 2 else f"other-{i}"
        previous = chain(
            previous,
            AuditRecord(
                now - 100 + i / args.audit, "ic-1", "incident_commander", "hold.create", target
            ),
        )
        entries.append(previous)  # fmt: skip
    with tempfile.TemporaryDirectory() as data_dir:
        initialise(Path(data_dir), now=now)
        authority = Authority.load(Path(data_dir))
    key_pem, cert_pem = authority.server_key_pem, authority.server_cert_pem
    assert previous is not None, "--audit must be at least 1"
    started = time.perf_counter()
    report = build(
        hold, views, opt_outs={}, audit=entries, head=ChainHead(previous.seq, previous.hash),
        checkpoint=None, now=now, epoch=1,
    )  # fmt: skip
    built = time.perf_counter()
    data = json.dumps(sign_report(report, key_pem, cert_pem), indent=1, sort_keys=True).encode()
    signed = time.perf_counter()
    page = render(report)
    print(
        json.dumps(
            {
                "laptops": args.laptops,
                "audit_entries": args.audit,
                "build_ms": round((built - started) * 1000, 1),
                "sign_and_encode_ms": round((signed - built) * 1000, 1),
                "json_bytes": len(data),
                "html_bytes": len(page.encode()),
            }
        )
    )


if __name__ == "__main__":
    main()
