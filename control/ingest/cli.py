"""``killswitch ingest`` (run the gateway) and ``killswitch ingest export`` (its only read path)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import getpass
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from killswitch.v1 import killswitch_pb2 as pb

from control.errors import InvalidInput
from control.logs import add_log_options
from control.logs import configure_logging

EXPORT_LOG = "export.log"


def add_ingest_parser(sub: Any) -> None:
    ingest = sub.add_parser(
        "ingest",
        help="run the ingest gateway agents upload their captured data to",
        description="Run the ingest gateway (or, with `export`, read its sink under audit).",
    )
    ingest.add_argument("--data-dir", help="the gateway's private directory (its sink)")
    ingest.add_argument("--listen", default="127.0.0.1:50061", help="upload listen address")
    ingest.add_argument(
        "--control", help="control server address(es), HOST:PORT[,HOST:PORT...], tried in turn"
    )
    ingest.add_argument("--identity", help="the gateway's identity directory (role ingest)")
    ingest.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and claimed identities: development only, loopback only",
    )
    ingest.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve the gateway's Prometheus /metrics here (default: none)",
    )
    add_log_options(ingest)
    ingest.set_defaults(handler=cmd_ingest, local=True)
    export = ingest.add_subparsers(dest="ingest_command", metavar="COMMAND").add_parser(
        "export",
        help="copy one agent's verified records out of the sink, and log who did",
        description="Copy one agent's records out of the sink after checking every"
        " checksum; each export is appended to DATA_DIR/export.log.",
    )
    export.add_argument("--data-dir", required=True, help="the gateway's data directory")
    export.add_argument("--agent", required=True, help="the agent whose data to export")
    export.add_argument("--day", help="one day only, YYYY-MM-DD (UTC); default: every day")
    export.add_argument("--out", required=True, help="file to write (JSON lines, mode 0600)")
    export.add_argument("--reason", required=True, help="why (a ticket): kept in the export log")
    export.add_argument(
        "--quarantine",
        action="store_true",
        help="export the refused batches kept under --keep-spool holds instead",
    )
    export.set_defaults(handler=cmd_export, local=True)


# Python collects its youngest generation every 700 allocations of container objects;
# an upload makes dozens (coroutines, futures, the request's wrappers) that die with it,
# so the collector ran every few uploads, about 10 us an upload (a tenth of the
# handler's CPU, measured in process with and without it; BENCHMARKS.md, 2026-12-06).
# Every 100,000 instead: what cycles leave behind still goes, a little later, bounded by
# the threshold.
GC_THRESHOLDS = (100_000, 50, 100)


def tune_garbage_collector() -> None:
    """Process-wide, like the umask: what start-up made (the modules) lives as long as
    the process, so it is frozen out of every collection; then the thresholds above."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def cmd_ingest(args: argparse.Namespace) -> int:
    from control.ingest.gateway import GatewayConfig
    from control.ingest.gateway import serve_gateway

    if not args.data_dir:
        raise InvalidInput("--data-dir DIR is needed: the gateway's private directory")
    if not args.control:
        raise InvalidInput("--control HOST:PORT[,...] is needed: the control server(s)")
    if not args.insecure and not args.identity:
        raise InvalidInput("--identity DIR is needed (the ingest-1 identity from init)")
    # The sink is the gateway's alone: everything it creates is owner-only.
    os.umask(0o077)
    tune_garbage_collector()
    configure_logging(args.log_format, args.log_level)
    config = GatewayConfig(
        data_dir=Path(args.data_dir),
        listen=args.listen,
        control=[a.strip() for a in args.control.split(",") if a.strip()],
        identity_dir=Path(args.identity) if args.identity else None,
        insecure=args.insecure,
        metrics=args.metrics,
    )
    asyncio.run(serve_gateway(config))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Verified records to a new owner-only file, and an entry in the export log first."""
    from control.ingest.sink_format import QUARANTINE_DIR
    from control.ingest.sink_format import SINK_DIR
    from control.ingest.sink_format import verified_records

    os.umask(0o077)
    data_dir, out = Path(args.data_dir), Path(args.out)
    kind = QUARANTINE_DIR if args.quarantine else SINK_DIR
    records = list(verified_records(data_dir, args.agent, args.day, kind))
    lines = []
    for entry, raw in records:
        batch = pb.UploadBatchRequest.FromString(raw)
        for event, nanos in zip(batch.events, batch.captured_at_unix_nano, strict=True):
            captured_at = Timestamp()
            captured_at.FromNanoseconds(nanos)
            lines.append(
                json.dumps(
                    {
                        "agent_id": batch.agent_id,
                        "sequence": batch.sequence,
                        "captured_at": captured_at.ToJsonString(),
                        "channel": event.channel,
                        "payload_b64": base64.b64encode(event.payload).decode(),
                        "received_at": entry.received_at,
                    },
                    sort_keys=True,
                )
            )
    data = ("\n".join(lines) + "\n").encode() if lines else b""
    audit = {
        "at": time.time(),
        "by": getpass.getuser(),
        "agent_id": args.agent,
        "day": args.day or "all",
        "from": kind,
        "reason": args.reason,
        "out": str(out.resolve()),
        "batches": len(records),
        "events": len(lines),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    try:
        out_fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise InvalidInput(f"--out {out}: {exc.strerror} (an export never overwrites)") from None
    # Logged before the data leaves: an export nobody can account for never happens.
    log_fd = os.open(data_dir / EXPORT_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(log_fd, (json.dumps(audit, sort_keys=True) + "\n").encode())
        os.fsync(log_fd)
    finally:
        os.close(log_fd)
    with os.fdopen(out_fd, "wb") as file:
        file.write(data)
    print(f"exported {len(lines)} events in {len(records)} verified batches to {out}")
    return 0
