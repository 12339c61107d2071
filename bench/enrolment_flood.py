"""CreateHold latency while the enrolment port is flooded (issue 15, finding 2).

Starts the real ``killswitch serve`` (mTLS, SQLite) in a fresh data dir, then:

* idle: ``--holds`` CreateHold calls one after another, as ``ic-1``;
* flooded: a separate process keeps ``--in-flight`` forged Enroll calls (a bad join
  token, no CSR) in flight on the enrolment port, from one source address, over one
  connection per 100 calls; once it has run ``--warmup`` seconds, the same CreateHold
  calls again;
* both phases ``--rounds`` times, in turn, so the p99 rests on enough calls (the 99th
  percentile of 200 is the second-slowest call) and both phases share the drift.

Prints p50 and p99 of each, the flooded/idle ratios (the target is at most 2x), what
the flood's calls ended with, and how many audit entries the flood left.

Run: ``.venv/bin/python -m bench.enrolment_flood [--in-flight 3000] [--holds 200] [--rounds 5]``.
``--killswitch PATH`` runs another build's server (e.g. main's, for a before figure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from bench.people import issue_person
from bench.procs import Child
from bench.procs import free_port
from bench.procs import install_cleanup
from control.client import Credentials
from control.client import OperatorClient
from control.domain.identity import Role
from control.domain.limits import AGGREGATED_ACTION
from control.pki import load_identity

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Calls per HTTP/2 connection of the flood, as a client opening many would spread them.
CALLS_PER_CONNECTION = 100


# ------------------------------------------------------------------ the flood (a child)


async def flood(target: str, ca_pem: bytes, in_flight: int) -> Counter[str]:
    """Keep ``in_flight`` forged Enroll calls going until SIGTERM; count their endings."""
    credentials = grpc.ssl_channel_credentials(ca_pem)
    connections = max(1, in_flight // CALLS_PER_CONNECTION)
    # Each its own connection, as many clients would open them.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.secure_channel(target, credentials, options) for _ in range(connections)]
    ended: Counter[str] = Counter()

    async def slot(n: int) -> None:
        enroll = pb_grpc.EnrollmentStub(channels[n % connections]).Enroll
        forged = pb.EnrollRequest(token="kst_forged.secret", agent_id=f"flood-{n}", csr_pem="x")
        while True:
            try:
                await enroll(forged, timeout=30)
                ended["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                ended[exc.code().name] += 1

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    slots = [asyncio.create_task(slot(n)) for n in range(in_flight)]
    await stop.wait()
    for task in slots:
        task.cancel()
    await asyncio.gather(*slots, return_exceptions=True)
    for channel in channels:
        await channel.close(grace=None)
    return ended


# ------------------------------------------------------------------ the measurement


class Server:
    def __init__(self, killswitch: Path, work: Path) -> None:
        self.data_dir = work / "data"
        self.address = f"127.0.0.1:{free_port()}"
        self.enroll_address = f"127.0.0.1:{free_port()}"
        self.http = f"127.0.0.1:{free_port()}"
        subprocess.run(
            [str(killswitch), "init", "--data-dir", str(self.data_dir)],
            check=True,
            capture_output=True,
        )
        ic = self.data_dir / "identities" / "ic-1"
        if not ic.exists():  # `init` makes only an administrator now (older builds: ic-1 too)
            issue_person(killswitch, self.data_dir, "ic-1", Role.INCIDENT_COMMANDER, ic)
        self.child = Child(
            "server",
            [
                *(str(killswitch), "serve", "--data-dir", str(self.data_dir)),
                *("--grpc", self.address, "--http", self.http, "--enroll", self.enroll_address),
            ],
            work / "server.log",
            ROOT,
        )
        deadline = time.monotonic() + 60
        while not self.ready():
            if not self.child.alive() or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start:\n{self.child.log_tail()}")
            time.sleep(0.2)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http}/readyz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def operator(self) -> OperatorClient:
        identity = load_identity(self.data_dir / "identities" / "ic-1")
        return OperatorClient(self.address, Credentials(identity=identity), timeout=60)


def hold_latencies(operator: OperatorClient, holds: int, label: str) -> list[float]:
    """Seconds per CreateHold, each for its own laptop, one after another."""
    seconds = []
    for n in range(holds):
        request = pb.CreateHoldRequest(
            scope=pb.Scope(agents=pb.AgentIds(ids=[f"laptop-{label}-{n}"])),
            reason="bench",
            ticket="BENCH-1",
        )
        started = time.perf_counter()
        operator.create_hold(request)
        seconds.append(time.perf_counter() - started)
    return seconds


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def audit_entries(operator: OperatorClient) -> list[pb.AuditEntry]:
    entries: list[pb.AuditEntry] = []
    while page := operator.list_audit(
        pb.ListAuditRequest(after_seq=entries[-1].seq if entries else 0)
    ).entries:
        entries.extend(page)
    return entries


def aggregated_calls(entries: list[pb.AuditEntry]) -> int:
    """Refused calls counted in aggregated entries (``denied: N calls``)."""
    return sum(int(e.result.split()[1]) for e in entries if e.action == AGGREGATED_ACTION)


def measure(args: argparse.Namespace) -> None:
    """Idle and flooded phases in turn, ``--rounds`` times over.

    Interleaving gives both phases the same drift (the holds table growing, the
    machine's noise) so the ratio compares like with like; one idle phase then one
    flooded phase put every drift into the flooded figure.
    """
    install_cleanup()
    idle: list[float] = []
    flooded: list[float] = []
    measured_for = 0.0
    busy = [0.0, 0.0]
    flood_ended: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="enrolment-flood-") as tmp:
        work = Path(tmp)
        server = Server(args.killswitch, work)
        operator = server.operator()
        hold_latencies(operator, 20, "warm")
        audit_before = len(audit_entries(operator))
        for round_number in range(args.rounds):
            idle += hold_latencies(operator, args.holds, f"idle{round_number}")
            flood_log = work / f"flood-{round_number}.log"
            flooder = Child(
                "flood",
                [
                    *(sys.executable, "-m", "bench.enrolment_flood", "flood"),
                    *("--target", server.enroll_address),
                    *("--ca", str(server.data_dir / "pki/ca.pem")),
                    *("--in-flight", str(args.in_flight)),
                ],
                flood_log,
                ROOT,
            )
            time.sleep(args.warmup)
            started, cpu = time.monotonic(), (server.child.cpu_seconds(), flooder.cpu_seconds())
            flooded += hold_latencies(operator, args.holds, f"flood{round_number}")
            measured_for += time.monotonic() - started
            busy[0] += server.child.cpu_seconds() - cpu[0]
            busy[1] += flooder.cpu_seconds() - cpu[1]
            if not flooder.alive():
                raise SystemExit(
                    f"the flood ended before the measurement did:\n{flooder.log_tail()}"
                )
            flooder.stop(grace=30)
            flood_ended.update(json.loads(flood_log.read_text().strip().splitlines()[-1]))
        time.sleep(12)  # the aggregated entries are written every 10 s
        added = audit_entries(operator)[audit_before:]
        operator.close()
        server.child.stop(grace=10)
    report(
        args,
        idle=idle,
        flooded=flooded,
        measured_for=measured_for,
        busy=(busy[0], busy[1]),
        flood_ended=json.dumps(dict(flood_ended)),
        audit_added=added,
    )


def report(
    args: argparse.Namespace,
    *,
    idle: list[float],
    flooded: list[float],
    measured_for: float,
    busy: tuple[float, float],
    flood_ended: str,
    audit_added: list[pb.AuditEntry],
) -> None:
    command = shlex.join([".venv/bin/python", "-m", "bench.enrolment_flood", *sys.argv[1:]])
    rows = [("idle", idle), (f"{args.in_flight} Enroll in flight", flooded)]
    print(f"CreateHold latency, {len(idle)} calls each, {args.rounds} rounds in turn (ms):")
    for label, values in rows:
        p50, p99 = percentile(values, 50) * 1e3, percentile(values, 99) * 1e3
        print(f"  {label:>26}: p50 {p50:8.2f}  p99 {p99:8.2f}  max {max(values) * 1e3:8.2f}")
    for pct in (50, 99):
        ratio = percentile(flooded, pct) / percentile(idle, pct)
        print(f"  p{pct} ratio flooded/idle: {ratio:.2f}x (target <= 2x)")
    print(
        f"  the flooded calls took {measured_for:.1f} s in all; meanwhile the server used"
        f" {busy[0] / measured_for:.0%} of a core, the flood client {busy[1] / measured_for:.0%}"
    )
    print(f"flood: {flood_ended}")
    print(
        f"audit entries added (incl. {2 * len(idle)} hold.create):"
        f" {len(audit_added)}, counting {aggregated_calls(audit_added)} refused calls"
    )
    print(f"median idle {statistics.median(idle) * 1e3:.2f} ms; command: {command}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode")
    child = sub.add_parser("flood", help="(internal) run the flood itself")
    child.add_argument("--target", required=True)
    child.add_argument("--ca", type=Path, required=True)
    child.add_argument("--in-flight", type=int, required=True)
    parser.add_argument("--in-flight", type=int, default=3000, help="forged Enroll calls")
    parser.add_argument("--holds", type=int, default=200, help="CreateHold calls per phase")
    parser.add_argument("--rounds", type=int, default=5, help="idle + flooded phases, in turn")
    parser.add_argument("--warmup", type=float, default=3.0, help="flood seconds before measuring")
    parser.add_argument("--killswitch", type=Path, default=BIN / "killswitch")
    args = parser.parse_args()
    if args.mode == "flood":
        ended = asyncio.run(flood(args.target, args.ca.read_bytes(), args.in_flight))
        print(json.dumps({"calls": sum(ended.values()), **ended}), flush=True)
    else:
        measure(args)


if __name__ == "__main__":
    main()
