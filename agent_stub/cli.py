"""``killswitch-agent``: one reference agent, or a simulated fleet.

Agents talk mTLS to the control server with a certificate they get by enrolling
(``--state-dir``, ``--enroll-token``); ``--insecure`` is for a loopback
development server. With ``--ingest`` they upload their capture to the ingest
gateway with the same certificate. Exit codes: 2 bad input or enrolment refused, 4
the enrolment server could not be reached, 1 any other enrolment failure or an
unreadable applied-epoch or upload-sequence file in the state directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import math
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

import structlog

from agent_stub.agent import Agent, ServerAddressError, open_channel, server_target
from agent_stub.applied import AppliedStore
from agent_stub.batches import MAX_EVENTS_PER_BATCH, SequenceStore, UploadSequence
from agent_stub.clock import PLATFORM_CLOCK, NoSleepClock
from agent_stub.config import AGENT_VERSION, AgentConfig, Fault, Tuning
from agent_stub.durable import StateFileError
from agent_stub.identity import (
    CA_FILE,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EnrolmentError,
    default_enroll_target,
    enrol,
    enrol_fleet,
    insecure_metadata,
    read_ca,
)
from agent_stub.local_state import LocalStateFile, NoticeBoard
from agent_stub.notices import NOTIFY_CHOICES, Notifier, NotifierSpecError, notifier_from
from agent_stub.simulate import Fleet, fault_counts, fleet_configs

MAX_SIMULATED_AGENTS = 50_000
DEFAULT_CONNECTIONS = 8
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


def enroll_target(args: argparse.Namespace) -> str:
    """Explicit, or the first control server's port + 1."""
    return str(args.enroll_server or default_enroll_target(args.server.split(",")[0].strip()))


def server_list(text: str) -> str:
    """Validate ``--server`` now, so a typo is a usage error rather than endless retries."""
    try:
        server_target(text)
    except ServerAddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def ingest_target(text: str) -> str:
    """``--ingest``: validated as ``--server`` is, as one gRPC target."""
    return server_target(server_list(text))


def add_ingest_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ingest",
        type=ingest_target,
        metavar="HOST:PORT",
        help=(
            "upload capture batches to this ingest gateway (`killswitch ingest`); without"
            " it the agent only asks the control server, which is deprecated"
        ),
    )


def trusted_ca(args: argparse.Namespace) -> bytes:
    return read_ca(args.ca or args.state_dir / CA_FILE)


async def run_one(args: argparse.Namespace) -> None:
    config = AgentConfig(agent_id=args.agent_id, labels=parse_labels(args.label or []))
    target = server_target(args.server)
    if isinstance(PLATFORM_CLOCK, NoSleepClock):
        # It still connects, so the server shows why: it nacks ALLOWED with this reason.
        sys.stderr.write(
            f"killswitch-agent: will not capture: {PLATFORM_CLOCK}; it stays connected"
            " and refuses every lease\n"
        )
    # Without a state directory (--insecure) the applied epoch and the upload sequence
    # live in memory only.
    applied_store = AppliedStore(args.state_dir) if args.state_dir is not None else None
    upload_sequence = None
    if args.ingest is not None and args.state_dir is not None:
        upload_sequence = UploadSequence(SequenceStore(args.state_dir))
    if args.insecure:
        credentials = None
        metadata = insecure_metadata(config.agent_id)
    else:
        identity = await enrol(
            enroll_target(args),
            args.enroll_token,
            config.agent_id,
            args.state_dir,
            trusted_ca(args),
        )
        credentials = identity.credentials()
        metadata = ()
    reopen = functools.partial(open_channel, target, credentials=credentials)
    channel = reopen()
    # The gateway trusts the same CA: the agent's own certificate says who uploads.
    ingest = None if args.ingest is None else open_channel(args.ingest, credentials=credentials)
    state_file = LocalStateFile(args.state_dir) if args.state_dir is not None else None
    try:
        agent = Agent(
            config,
            channel,
            call_metadata=metadata,
            reopen=reopen,
            clock=PLATFORM_CLOCK,
            applied_store=applied_store,
            ingest=ingest,
            upload_sequence=upload_sequence,
            notices=NoticeBoard(config.agent_id, args.notify, state_file),
        )
        await agent.run()
    finally:
        await channel.close(grace=None)
        if ingest is not None:
            await ingest.close(grace=None)


async def simulate(args: argparse.Namespace) -> None:
    tuning = Tuning(
        capture_tick=args.capture_tick,
        upload_every=args.upload_every,
        batch_events=args.batch_events,
        slow_max=args.slow_max,
    )
    configs = fleet_configs(
        args.agents,
        seed=args.seed,
        id_prefix=args.id_prefix,
        faults=fault_counts(args.faults, args.agents),
        tuning=tuning,
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


async def show_status(args: argparse.Namespace) -> None:
    """``killswitch-agent status``: the laptop's own view, read from its state file."""
    state = LocalStateFile(args.state_dir).load()
    if state is None:
        raise UsageError(
            f"no capture state in {args.state_dir}: the agent has not applied a directive yet"
        )
    print(json.dumps(asdict(state), indent=2) if args.json else state.describe())


def notifier(text: str) -> Notifier:
    try:
        return notifier_from(text)
    except NotifierSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_notify_option(parser: argparse.ArgumentParser, default: str | None, where: str) -> None:
    parser.add_argument(
        "--notify",
        type=notifier,
        default=default,
        metavar="BACKEND",
        help=f"where notices of capture-state changes go: {NOTIFY_CHOICES} ({where})",
    )


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


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or more seconds")
    return value


def seconds_either_way(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds")
    return value


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than zero seconds")
    return value


def add_identity_options(parser: argparse.ArgumentParser, state_dir_help: str) -> None:
    parser.add_argument("--state-dir", type=Path, metavar="DIR", help=state_dir_help)
    parser.add_argument(
        "--enroll-token",
        default="",
        metavar="TOKEN",
        help="join token (`killswitch enroll-token create`), needed until enrolled",
    )
    parser.add_argument(
        "--enroll-server",
        metavar="HOST:PORT",
        help="the enrolment port (default: the --server host, port + 1)",
    )
    parser.add_argument(
        "--ca", type=Path, metavar="FILE", help="CA certificate to trust (default: DIR/ca.pem)"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext to a loopback development server (`killswitch serve --insecure`)",
    )


def check_identity_options(args: argparse.Namespace) -> None:
    if args.insecure:
        mtls_only = {
            "--state-dir": args.state_dir,
            "--enroll-token": args.enroll_token,
            "--enroll-server": args.enroll_server,
            "--ca": args.ca,
        }
        given = [flag for flag, value in mtls_only.items() if value]
        if given:
            raise UsageError(f"{', '.join(given)} cannot be combined with --insecure")
        return
    if args.state_dir is None:
        raise UsageError("--state-dir DIR is required (or --insecure for a development server)")
    if getattr(args, "connections", None) is not None:
        raise UsageError(
            "--connections applies only with --insecure: over mTLS each agent has its own"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="killswitch-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one reference agent")
    run.add_argument(
        "--server",
        required=True,
        type=server_list,
        help="control server HOST:PORT; replicas: IP:PORT,IP:PORT,... or one DNS name for all",
    )
    run.add_argument("--agent-id", required=True)
    run.add_argument("--label", action="append", metavar="K=V", help="a label (repeatable)")
    add_ingest_option(run)
    add_notify_option(run, "desktop", "default desktop; a failing one never stops a pause")
    add_identity_options(run, "where the agent keeps its key, certificate and upload sequence")
    run.set_defaults(func=run_one)

    status = sub.add_parser("status", help="print this laptop's capture state, as last applied")
    status.add_argument(
        "--state-dir", type=Path, required=True, metavar="DIR", help="the agent's state directory"
    )
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=show_status)

    sim = sub.add_parser("simulate", help="run N simulated agents in this process")
    sim.add_argument(
        "--server",
        required=True,
        type=server_list,
        help="control server HOST:PORT; replicas: IP:PORT,IP:PORT,... or one DNS name for all",
    )
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
    sim.add_argument("--capture-tick", type=positive_seconds, default=1.0, metavar="SECONDS")
    sim.add_argument("--upload-every", type=positive_seconds, default=30.0, metavar="SECONDS")
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
    sim.set_defaults(func=simulate)
    return parser


def fail(message: str, exit_code: int) -> NoReturn:
    sys.stderr.write(f"killswitch-agent: error: {message}\n")
    sys.exit(exit_code)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "simulate":
            if args.agents > MAX_SIMULATED_AGENTS:
                raise UsageError(f"at most {MAX_SIMULATED_AGENTS} agents per process")
            args.faults = parse_faults(args.fault)
        if args.command != "status":
            check_identity_options(args)
        # One agent logs its reconnects; a simulated fleet only what needs attention.
        level = logging.INFO if args.command == "run" else logging.WARNING
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))
        asyncio.run(args.func(args))
    except UsageError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    except EnrolmentError as exc:
        fail(str(exc), exc.exit_code)
    except StateFileError as exc:
        fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            sys.stderr.write("killswitch-agent: stopped\n")
        sys.exit(130)
