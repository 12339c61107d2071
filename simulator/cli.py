"""The ``killswitch-agent`` program: the reference agent's commands (``agent_stub.cli``)
and ``simulate``, a fleet of simulated agents in this process.

The program is put together here, above both, so the reference agent never imports
the simulator. The simulate command validates its input as the agent's commands do
(exit code 2 and one line on bad input).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
from collections.abc import Sequence
from pathlib import Path

from agent_stub.batches import MAX_EVENTS_PER_BATCH
from agent_stub.channels import server_target
from agent_stub.cli import UsageError
from agent_stub.cli import add_identity_options
from agent_stub.cli import add_ingest_option
from agent_stub.cli import add_notify_option
from agent_stub.cli import add_server_option
from agent_stub.cli import check_identity_options
from agent_stub.cli import enroll_target
from agent_stub.cli import main as agent_main
from agent_stub.cli import trusted_ca
from agent_stub.config import AGENT_VERSION
from agent_stub.config import Tuning
from agent_stub.identity import enrol_fleet
from simulator.faults import Fault
from simulator.faults import FaultTuning
from simulator.fleet import Fleet
from simulator.fleet import fault_counts
from simulator.fleet import fleet_configs

MAX_SIMULATED_AGENTS = 50_000
DEFAULT_CONNECTIONS = 8
# The agents' own pacing, which the flags below default to.
TUNING = Tuning()
FAULT_KINDS = ", ".join(f.value for f in Fault if f is not Fault.NONE)


def main(argv: Sequence[str] | None = None) -> None:
    """``killswitch-agent`` (pyproject.toml's console script)."""
    agent_main(argv, add_simulate_command)


async def simulate(args: argparse.Namespace) -> None:
    tuning = Tuning(
        capture_tick=args.capture_tick,
        upload_every=args.upload_every,
        batch_events=args.batch_events,
    )
    configs = fleet_configs(
        args.agents,
        seed=args.seed,
        id_prefix=args.id_prefix,
        faults=fault_counts(args.faults, args.agents),
        tuning=tuning,
        fault_tuning=FaultTuning(slow_max=args.slow_max),
    )
    for config in configs:
        config.agent_version = args.agent_version
        config.clock_skew = args.clock_skew
    connections = args.connections or DEFAULT_CONNECTIONS
    if args.insecure:
        identities = None
        transport = f"{min(connections, args.agents)} plaintext connections"
    else:
        identities, enrolled_now = await enrol_fleet(
            enroll_target(args),
            args.enroll_token,
            [c.agent_id for c in configs],
            args.state_dir,
            trusted_ca(args),
        )
        print(
            f"enrolled {enrolled_now} agents, {args.agents - enrolled_now} already were",
            flush=True,
        )
        transport = f"{args.agents} mTLS connections (one per agent)"
    fleet = Fleet(
        server_target(args.server),
        configs,
        connections=connections,
        identities=identities,
        seed=args.seed,
        fault_after=args.fault_after,
        truth_path=args.truth,
        ingest_target=args.ingest,
        no_sleep_clock=args.no_sleep_clock,
        notifier=args.notify,
    )
    print(f"simulating {args.agents} agents against {args.server} over {transport}", flush=True)
    runner = asyncio.create_task(fleet.run())
    # SIGTERM stops the fleet the way Ctrl-C does, so the truth file is written once more.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, runner.cancel)
    while not runner.done():
        await asyncio.wait({runner}, timeout=args.report_every)
        if not runner.done():
            print(fleet.summary(), flush=True)
    if not runner.cancelled():
        await runner


def check_simulation(args: argparse.Namespace) -> None:
    """Refused before anything starts: too many agents, bad faults, bad identity options."""
    if args.agents > MAX_SIMULATED_AGENTS:
        raise UsageError(f"at most {MAX_SIMULATED_AGENTS} agents per process")
    args.faults = parse_faults(args.fault)
    check_identity_options(args)


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


def add_simulate_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sim = sub.add_parser("simulate", help="run N simulated agents in this process")
    add_server_option(sim)
    sim.add_argument("--agents", type=positive_int, required=True)
    sim.add_argument("--seed", type=int, default=1, help="labels and faults are derived from it")
    sim.add_argument(
        "--connections",
        type=positive_int,
        help=(
            f"with --insecure: gRPC connections shared by the agents (default"
            f" {DEFAULT_CONNECTIONS}); N gives one per agent"
        ),
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
    sim.add_argument(
        "--capture-tick", type=positive_seconds, default=TUNING.capture_tick, metavar="SECONDS"
    )
    sim.add_argument(
        "--upload-every", type=positive_seconds, default=TUNING.upload_every, metavar="SECONDS"
    )
    sim.add_argument(
        "--batch-events",
        type=batch_events,
        default=MAX_EVENTS_PER_BATCH,
        metavar="N",
        help=f"events per uploaded batch, oldest first (default {MAX_EVENTS_PER_BATCH})",
    )
    sim.add_argument("--report-every", type=positive_seconds, default=10.0, metavar="SECONDS")
    sim.add_argument(
        "--agent-version",
        default=AGENT_VERSION,
        metavar="V",
        help=f"the version the agents report (default {AGENT_VERSION}): rehearse an old fleet",
    )
    sim.add_argument(
        "--clock-skew",
        type=seconds_either_way,
        default=0.0,
        metavar="SECONDS",
        help="the agents' wall clocks run this far ahead (negative: behind) of true time",
    )
    sim.add_argument(
        "--no-sleep-clock",
        action="store_true",
        help="the agents have no clock that counts sleep: they report so and never capture",
    )
    add_ingest_option(sim)
    add_notify_option(sim, None, "default none; file:PATH gets one line per agent's notice")
    add_identity_options(sim, "one subdirectory per agent for its key and certificate")
    sim.set_defaults(func=simulate, check=check_simulation)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number")
    return int(text)


def batch_events(text: str) -> int:
    """``--batch-events``: 1 up to the reference agent's own batch size."""
    value = positive_int(text)
    if value > MAX_EVENTS_PER_BATCH:
        raise argparse.ArgumentTypeError(f"{text!r} must be at most {MAX_EVENTS_PER_BATCH} events")
    return value


def number_of_seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None


def seconds(text: str) -> float:
    value = number_of_seconds(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or more seconds")
    return value


def seconds_either_way(text: str) -> float:
    value = number_of_seconds(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds")
    return value


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than zero seconds")
    return value
