"""The pause benchmark's command line: flags, the comparisons they ask for, and ``main``.

``main`` runs each system once per (system, topology, N), even when two comparisons
share it, reports what finished even if a run failed, and exits 1 if any did.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC
from datetime import datetime
from pathlib import Path

import grpc

from bench import pause_fleet
from bench.console import log
from bench.console import this_command
from bench.pause_fleet.phases import Pace
from bench.pause_fleet.postgres import check_admin_url
from bench.pause_fleet.report import report
from bench.pause_fleet.results import Run
from bench.pause_fleet.run import Bench
from bench.pause_fleet.systems import BARE_TLS
from bench.pause_fleet.systems import BASELINE
from bench.pause_fleet.systems import PRODUCT
from bench.pause_fleet.systems import PRODUCT_MTLS
from bench.pause_fleet.systems import TUNED_BASELINE
from bench.pause_fleet.systems import Comparison
from bench.pause_fleet.systems import RunKey
from bench.pause_fleet.systems import Storage
from bench.pause_fleet.systems import Topology
from bench.pause_fleet.systems import run_key
from bench.procs import install_cleanup
from bench.procs import stop_all

MODULE = "bench.pause_fleet"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description=pause_fleet.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--agents", type=int, default=10_000, help="N (default %(default)s)")
    parser.add_argument(
        "--topology",
        choices=["per-agent", "mux", "mtls", "both", "all"],
        default="both",
        help=(
            "per-agent: one plaintext connection per agent; mux: the simulator's 8 shared"
            " connections (both against the bare baseline); mtls: the product over mTLS"
            " against the bare baseline over TLS with client certificates and the product"
            " --insecure, per-agent; both: per-agent and mux; all: the three"
        ),
    )
    parser.add_argument("--connections", type=int, default=8, help="K for mux (default 8)")
    parser.add_argument("--repeat", type=int, default=1, help="pushes/restarts per run; medians")
    parser.add_argument(
        "--mtls-agents", type=int, help="N for the mtls comparison (default: --agents)"
    )
    parser.add_argument(
        "--mtls-repeat", type=int, help="--repeat for the mTLS run (default: --repeat)"
    )
    parser.add_argument("--skip-restart", action="store_true", help="no kill -9 / reconnect")
    parser.add_argument(
        "--skip-verify",
        action="store_true",
        help="do not wait for the product to verify every agent stopped after each push",
    )
    parser.add_argument(
        "--tuned-baseline",
        action="store_true",
        help="also run the baseline with gc.freeze() before each push (the notes' tuned floor)",
    )
    parser.add_argument(
        "--database",
        metavar="URL",
        default="",
        help=(
            "run the product on PostgreSQL instead of SQLite: URL of a PostgreSQL server,"
            " postgresql://[USER[:PASSWORD]@]HOST[:PORT][/DB], e.g."
            " postgresql://postgres@127.0.0.1:5432/postgres. The role must be allowed to"
            " CREATE DATABASE: every product run gets a fresh scratch database"
            " (pause_fleet_*) on that server, passed to `killswitch init`/`serve"
            " --database`, and dropped after the run. DB (default postgres) is only used"
            " to create and drop them; nothing is written to it"
        ),
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help=(
            "product servers sharing the --database (required for N > 1), the CA copied"
            " from the first; the fleet gets every address, each agent picks one; the"
            " pause goes to replica 0 and every replica is polled. N > 1 skips the"
            " restart phase (default 1)"
        ),
    )
    parser.add_argument("--poll", type=float, default=0.05, help="GetStatus poll interval, s")
    parser.add_argument(
        "--verify-poll",
        type=float,
        default=0.25,
        help="GetStatus poll interval while waiting for VERIFIED_STOPPED, s (default 0.25)",
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="bound on every wait, s")
    parser.add_argument(
        "--enrol-timeout", type=float, default=1800.0, help="bound on an mTLS fleet's enrolment, s"
    )
    parser.add_argument("--settle", type=float, default=3.0, help="quiet time between phases, s")
    return parser


def comparisons_for(args: argparse.Namespace) -> list[Comparison]:
    n, repeat = args.agents, args.repeat
    baselines = (BASELINE, *((TUNED_BASELINE,) if args.tuned_baseline else ()))
    per_agent = Comparison("per-agent", Topology("per-agent", n), n, repeat, PRODUCT, baselines)
    mux = Comparison("mux", Topology("mux", args.connections), n, repeat, PRODUCT, baselines)
    m = args.mtls_agents or n
    mtls = Comparison(
        "mtls", Topology("per-agent", m), m, args.mtls_repeat or repeat, PRODUCT_MTLS,
        (BARE_TLS, PRODUCT),
    )  # fmt: skip
    return {
        "per-agent": [per_agent],
        "mux": [mux],
        "mtls": [mtls],
        "both": [per_agent, mux],
        "all": [per_agent, mtls, mux],
    }[args.topology]


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    why = ""
    if args.replicas < 1:
        why = "--replicas must be at least 1"
    elif args.replicas > 1 and not args.database:
        why = "--replicas > 1 needs --database postgresql://...: replicas share one PostgreSQL"
    elif args.database:
        why = check_admin_url(args.database) or ""
    if why:  # one line, no usage block: the mistake is in a value, not in the syntax
        print(f"{parser.prog}: error: {why}", file=sys.stderr)
        sys.exit(2)
    storage = Storage(args.database, args.replicas)
    # The product reads its database from the environment too: not here, unless asked.
    os.environ.pop("KILLSWITCH_DATABASE", None)
    install_cleanup()
    comparisons = comparisons_for(args)
    started = datetime.now(UTC)
    runs: dict[RunKey, Run] = {}
    failed: dict[RunKey, str] = {}
    with tempfile.TemporaryDirectory(prefix="pause-fleet-") as tmp:
        bench = Bench(
            pace=Pace(
                poll_interval=args.poll,
                verify_poll=args.verify_poll,
                timeout=args.timeout,
                enrol_timeout=args.enrol_timeout,
                settle=args.settle,
            ),
            restart=not args.skip_restart,
            verify=not args.skip_verify,
            workdir=Path(tmp),
            storage=storage,
        )
        try:
            for comparison in comparisons:
                for system in comparison.systems:
                    key = run_key(system, comparison)
                    if key in runs or key in failed:
                        continue  # the same run serves both comparisons
                    # The subject's own repeat count (mtls may run fewer rounds).
                    repeat = comparison.repeat if system == comparison.subject else args.repeat
                    try:
                        runs[key] = bench.run(
                            system, comparison.topology, comparison.agents, repeat
                        )
                    except Exception as exc:  # report what did finish
                        log(f"{system.name} on {comparison.name} failed: {exc}")
                        failed[key] = f"{type(exc).__name__}: {exc}"
        finally:
            stop_all()
    complete = [c for c in comparisons if all(run_key(s, c) in runs for s in c.systems)]
    print(f"command: {this_command(MODULE)}")
    print(f"machine: {os.cpu_count()} cores, {os.uname().sysname} {os.uname().release}")
    print(f"date: {started:%Y-%m-%d %H:%M} UTC, grpcio {grpc.__version__}")
    print(f"product store: {storage.describe()}")
    print()
    print(report(complete, runs, storage))
    for (name, topology, agents), why in failed.items():
        print(f"\nFAILED: {name}, {topology.name}, {agents} agents: {why}")
    if failed:
        sys.exit(1)
