"""The ingest drill's command line: flags, and ``main``, which runs the baseline side,
then the product side, and prints the report of whatever completed."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from agent_stub.config import Tuning
from bench import ingest_drill
from bench.console import log
from bench.ingest_drill.metrics import load_average
from bench.ingest_drill.report import MODULE
from bench.ingest_drill.report import report
from bench.ingest_drill.run import Bench
from bench.procs import install_cleanup
from bench.procs import stop_all
from control.cli.options import positive_int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description=ingest_drill.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--agents", type=int, default=10_000)
    upload_every = Tuning().upload_every
    parser.add_argument(
        "--upload-every",
        type=float,
        default=upload_every,
        help=f"seconds (default {upload_every:g})",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=8,
        help="shared connections of the fleet, and of the burst (default 8)",
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=None,
        help="the server's lease TTL (default: the product's, 60 s); the drill waits 3 of them",
    )
    parser.add_argument(
        "--slow-max",
        type=float,
        default=10.0,
        help="slow agents act on a directive within this (default 10 s)",
    )
    parser.add_argument("--window", type=float, default=30.0, help="steady window, s (default 30)")
    parser.add_argument("--probes", type=int, default=8, help="probe agents (default 8)")
    parser.add_argument(
        "--probe-every",
        type=float,
        default=2.0,
        help="seconds between a probe's uploads (default 2: above the verdict cache's 1 s)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=256, help="uploads in flight in the burst (default 256)"
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=5,
        help="timed rounds per side; the median stands for it (default 5: a round moves"
        " by 10-20%% with what else the box runs, and 3 left the median to one of them)",
    )
    parser.add_argument(
        "--fleet-processes",
        type=int,
        default=2,
        help="simulator processes sharing the fleet (default 2)",
    )
    parser.add_argument(
        "--burst-agents",
        type=int,
        default=0,
        help="agents the round uploads as, held by the probe simulator (default: --agents)",
    )
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-burst", action="store_true")
    parser.add_argument("--skip-drill", action="store_true", help="no pause")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    install_cleanup()
    root = Path(tempfile.mkdtemp(prefix="ingest_drill_"))
    log(f"working in {root}; {load_average()}")
    bench = Bench(args, root)
    failure = ""
    try:
        if not args.skip_baseline:
            bench.run(product=False)
        bench.run(product=True)
    except (RuntimeError, TimeoutError, AssertionError) as exc:
        failure = " ".join(str(exc).split())
        log(f"FAILED: {failure}")
    finally:
        stop_all()
        bench.volumes.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(report(args, bench.sides))
    if failure:
        print(f"\nFAILED (figures above are the runs that completed): {failure}")
    if args.keep:
        print(f"\n(working directory kept: {root})")
