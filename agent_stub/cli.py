"""``killswitch-agent``: one reference agent, or a simulated fleet."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

import structlog

from agent_stub.agent import Agent, AgentConfig, Behaviour, open_channel
from agent_stub.simulate import Fleet, fleet_configs

MAX_SIMULATED_AGENTS = 50_000


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


def parse_faults(items: Sequence[str], agents: int) -> dict[Behaviour, int]:
    faults: dict[Behaviour, int] = {}
    for item in items:
        kind, sep, count = item.partition("=")
        try:
            behaviour = Behaviour(kind)
        except ValueError:
            raise UsageError(f"bad fault {item!r}: kind is one of nack, silent") from None
        if not sep or not count.isdigit() or behaviour is Behaviour.OBEDIENT:
            raise UsageError(f"bad fault {item!r}: expected nack=N or silent=N")
        faults[behaviour] = faults.get(behaviour, 0) + int(count)
    if sum(faults.values()) > agents:
        raise UsageError(f"more faulty agents ({sum(faults.values())}) than agents ({agents})")
    return faults


async def run_one(args: argparse.Namespace) -> None:
    config = AgentConfig(agent_id=args.agent_id, labels=parse_labels(args.label or []))
    channel = open_channel(args.server)
    try:
        await Agent(config, channel).run()
    finally:
        await channel.close(grace=None)


async def simulate(args: argparse.Namespace) -> None:
    configs = fleet_configs(
        args.agents,
        seed=args.seed,
        id_prefix=args.id_prefix,
        faults=parse_faults(args.fault or [], args.agents),
    )
    fleet = Fleet(args.server, configs, connections=args.connections, seed=args.seed)
    print(
        f"simulating {args.agents} agents against {args.server} over"
        f" {min(args.connections, args.agents)} connections",
        flush=True,
    )
    runner = asyncio.create_task(fleet.run())
    while not runner.done():
        await asyncio.wait({runner}, timeout=args.report_every)
        if not runner.done():
            print(fleet.summary(), flush=True)
    await runner


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number")
    return int(text)


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
        metavar="KIND=N",
        help="make N agents misbehave: nack (cannot stop) or silent (never acks)",
    )
    sim.add_argument("--report-every", type=float, default=10.0, metavar="SECONDS")
    sim.set_defaults(func=simulate)
    return parser


def usage_error(message: str) -> NoReturn:
    sys.stderr.write(f"killswitch-agent: error: {message}\n")
    sys.exit(2)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "simulate" and args.agents > MAX_SIMULATED_AGENTS:
        usage_error(f"at most {MAX_SIMULATED_AGENTS} agents per process")
    # One agent logs its reconnects; a simulated fleet only what needs attention.
    level = logging.INFO if args.command == "run" else logging.WARNING
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))
    try:
        asyncio.run(args.func(args))
    except UsageError as exc:
        usage_error(str(exc))
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            sys.stderr.write("killswitch-agent: stopped\n")
        sys.exit(130)
