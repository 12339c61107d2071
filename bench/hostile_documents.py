"""Hostile runbooks against a real server: how fast they are refused, and how long an
incident commander's ``status`` takes meanwhile (issue 15: one alias bomb once held
the event loop, IC calls included, for 12 s).

It starts ``killswitch init`` + ``killswitch serve`` (mTLS, SQLite) in a temporary
directory, measures ``GetStatus`` as ic-1 alone, then for each hostile runbook of
``tests/hostile_documents.py`` fires ``--bombs`` PlanRunbook calls from sre-1,
approver-1 and automation-1 (``--concurrency`` in flight each) while ic-1 calls
``GetStatus`` back to back, and prints p50/p99/max of both.

Run: ``.venv/bin/python -m bench.hostile_documents [--bombs 300] [--concurrency 4]``.
"""

from __future__ import annotations

import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from argparse import ArgumentParser
from argparse import Namespace
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from bench.people import issue_operators
from bench.procs import Child
from bench.procs import free_port
from bench.procs import install_cleanup
from bench.procs import stop_all
from control.pki import load_identity
from tests.hostile_documents import HOSTILE

KILLSWITCH = Path(sys.executable).parent / "killswitch"
SENDERS = ("sre-1", "approver-1", "automation-1")
BASELINE_CALLS = 300


def start_server(data_dir: Path, *extra: str) -> tuple[Child, str, str]:
    """The server (``extra``: more ``serve`` options), its gRPC address and its
    enrolment address."""
    subprocess.run(
        [str(KILLSWITCH), "init", "--data-dir", str(data_dir)], check=True, capture_output=True
    )
    issue_operators(KILLSWITCH, data_dir)
    deadline = time.monotonic() + 60
    address, http, enroll = (f"127.0.0.1:{free_port()}" for _ in range(3))
    argv = [
        str(KILLSWITCH), "serve", "--data-dir", str(data_dir), "--grpc", address,
        "--http", http, "--enroll", enroll, "--log-format", "json", *extra,
    ]  # fmt: skip
    server = Child("server", argv, data_dir / "server.log", data_dir)
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{http}/readyz", timeout=1) as ready:
                if ready.status == 200:
                    return server, address, enroll
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server not ready:\n{server.log_tail()}")


def channel(data_dir: Path, address: str, name: str) -> grpc.Channel:
    identity = load_identity(data_dir / "identities" / name)
    return grpc.secure_channel(
        address,
        grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem),
    )


def timed_status(stub: pb_grpc.OperatorStub) -> float:
    started = time.perf_counter()
    stub.GetStatus(pb.GetStatusRequest(), timeout=60)
    return time.perf_counter() - started


def timed_plan(stub: pb_grpc.RunbooksStub, text: str) -> tuple[float, str, int]:
    request = pb.PlanRunbookRequest(runbook=pb.RunbookSource(text=text, file_name="bomb.yaml"))
    started = time.perf_counter()
    try:
        stub.PlanRunbook(request, timeout=60)
        code, details = "OK", ""
    except grpc.RpcError as exc:
        code, details = exc.code().name, exc.details() or ""
    return time.perf_counter() - started, code, len(details)


def summary(seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return f"p50 {statistics.median(ms):7.1f}  p99 {p99:7.1f}  max {ms[-1]:7.1f} ms (n={len(ms)})"


def under_fire(
    ic: pb_grpc.OperatorStub, senders: list[pb_grpc.RunbooksStub], text: str, args: Namespace
) -> tuple[list[tuple[float, str, int]], list[float]]:
    """``args.bombs`` PlanRunbook calls of ``text``, and ic-1's status calls meanwhile."""
    statuses: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            statuses.append(timed_status(ic))

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(len(senders) * args.concurrency) as pool:
        answers = list(
            pool.map(lambda i: timed_plan(senders[i % len(senders)], text), range(args.bombs))
        )
    done.set()
    watcher.join()
    return answers, statuses


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bombs", type=int, default=300, help="PlanRunbook calls per kind")
    parser.add_argument("--concurrency", type=int, default=4, help="in flight per identity")
    args = parser.parse_args()
    install_cleanup()
    command = [Path(sys.executable).name, "-m", "bench.hostile_documents", *sys.argv[1:]]
    print("command:", shlex.join(command))
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        data_dir = Path(tmp)
        try:
            server, address, _ = start_server(data_dir)
            ic = pb_grpc.OperatorStub(channel(data_dir, address, "ic-1"))
            senders = [pb_grpc.RunbooksStub(channel(data_dir, address, n)) for n in SENDERS]
            timed_status(ic)
            alone = [timed_status(ic) for _ in range(BASELINE_CALLS)]
            print(f"{'status alone':<21} {summary(alone)}")
            for kind, text in HOSTILE.items():
                answers, statuses = under_fire(ic, senders, text, args)
                codes = Counter(code for _, code, _ in answers)
                longest = max(length for _, _, length in answers)
                print(f"{kind:<14} bomb   {summary([s for s, _, _ in answers])}  {dict(codes)}"
                      f", longest message {longest} chars")  # fmt: skip
                print(f"{'':<14} status {summary(statuses)}")
            print(f"server alive: {server.alive()}, RSS {server.rss_kib() // 1024} MiB")
        finally:
            stop_all()


if __name__ == "__main__":
    main()
