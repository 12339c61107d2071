"""``killswitch-agent``: one reference agent, or a simulated fleet."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import structlog

from agent_stub.agent import Agent, open_channel
from agent_stub.config import AgentConfig, Fault, Tuning
from agent_stub.simulate import Fleet, fault_counts, fleet_configs

MAX_SIMULATED_AGENTS = 50_000
FAULT_KINDS = ", ".join(f.value for f in Fault if f is not Fault.NONE)


class UsageError(Exception):
    pass


def parse_labels(pairs: Sequence[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError(f"bad label {pair!r}: expected k=v")
        labels[key.strip()] = value.strip()
    return labels


def parse_faults(items: Sequence[str]) -> dict[Fault, float]:
    """``KIND=FRACTION[,KIND=FRACTION...]`` (repeatable) -> the fraction of agents per fault."""
    fractions: dict[Fault, float] = {}
    for item in (part for group in items for part in group.split(",")):
        kind, _, value = item.partition("=")
        try:
            fault, fraction = Fault(kind.strip()), float(value)
        except ValueError:
            fault, fraction = Fault.NONE, math.nan
        if fault is Fault.NONE or not 0 <= fraction <= 1:
            raise UsageError(
                f"bad fault {item!r}: expected KIND=FRACTION with FRACTION in 0..1"
                f" and KIND one of {FAULT_KINDS}"
            )
        fractions[fault] = fractions.get(fault, 0.0) + fraction
    total = sum(fractions.values())
    if total > 1 + 1e-9:
        raise UsageError(f"fault fractions add up to {total:g}; at most 1 (the whole fleet)")
    return fractions


async def run_one(args: argparse.Namespace) -> None:
    config = AgentConfig(agent_id=args.agent_id, labels=parse_labels(args.label or []))
    channel = open_channel(args.server)
    try:
        await Agent(config, channel).run()
    finally:
        await channel.close(grace=None)


async def simulate(args: argparse.Namespace) -> None:
    tuning = Tuning(
        capture_tick=args.capture_tick, upload_every=args.upload_every, slow_max=args.slow_max
    )
    configs = fleet_configs(
        args.agents,
        seed=args.seed,
        id_prefix=args.id_prefix,
        faults=fault_counts(args.faults, args.agents),
        tuning=tuning,
    )
    fleet = Fleet(
        args.server,
        configs,
        connections=args.connections,
        seed=args.seed,
        fault_after=args.fault_after,
        truth_path=args.truth,
    )
    print(
        f"simulating {args.agents} agents against {args.server} over"
        f" {min(args.connections, args.agents)} connections",
        flush=True,
    )
    runner = asyncio.create_task(fleet.run())
    # SIGTERM stops the fleet the way Ctrl-C does, so the truth file is written once more.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, runner.cancel)
    while not runner.done():
        await asyncio.wait({runner}, timeout=args.report_every)
        if not runner.done():
            print(fleet.summary(), flush=True)
    if not runner.cancelled():
        await runner


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number")
    return int(text)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or more seconds")
    return value


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than zero seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="killswitch-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one reference agent")
    run.add_argument("--server", required=True, help="control server HOST:PORT")
    run.add_argument("--agent-id", required=True)
    run.add_argument("--label", action="append", metavar="K=V", help="a label (repeatable)")
    run.set_defaults(func=run_one)

    sim = sub.add_parser("simulate", help="run N simulated agents in this process")
    sim.add_argument("--server", required=True, help="control server HOST:PORT")
    sim.add_argument("--agents", type=positive_int, required=True)
    sim.add_argument("--seed", type=int, default=1, help="labels and faults are derived from it")
    sim.add_argument(
        "--connections",
        type=positive_int,
        default=8,
        help="gRPC connections shared by the agents; N gives one per agent",
    )
    sim.add_argument("--id-prefix", default="laptop", help="agent ids are PREFIX-00000 ...")
    sim.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND=FRACTION[,...]",
        help=f"make that fraction of the agents misbehave after the trigger: {FAULT_KINDS}",
    )
    sim.add_argument(
        "--fault-after",
        type=seconds,
        default=15.0,
        metavar="SECONDS",
        help="trigger the faults this long after start, or on SIGUSR1 if sooner (default 15)",
    )
    sim.add_argument(
        "--truth",
        type=Path,
        metavar="PATH",
        help="write what every agent really captured here (JSON), every second and at exit",
    )
    sim.add_argument(
        "--slow-max",
        type=seconds,
        default=20.0,
        metavar="SECONDS",
        help="slow agents apply each directive after up to this long (default 20)",
    )
    sim.add_argument("--capture-tick", type=positive_seconds, default=1.0, metavar="SECONDS")
    sim.add_argument("--upload-every", type=positive_seconds, default=30.0, metavar="SECONDS")
    sim.add_argument("--report-every", type=positive_seconds, default=10.0, metavar="SECONDS")
    sim.set_defaults(func=simulate)
    return parser


def usage_error(message: str) -> NoReturn:
    sys.stderr.write(f"killswitch-agent: error: {message}\n")
    sys.exit(2)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "simulate":
            if args.agents > MAX_SIMULATED_AGENTS:
                raise UsageError(f"at most {MAX_SIMULATED_AGENTS} agents per process")
            args.faults = parse_faults(args.fault)
        # One agent logs its reconnects; a simulated fleet only what needs attention.
        level = logging.INFO if args.command == "run" else logging.WARNING
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))
        asyncio.run(args.func(args))
    except UsageError as exc:
        usage_error(str(exc))
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            sys.stderr.write("killswitch-agent: stopped\n")
        sys.exit(130)
