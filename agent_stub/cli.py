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
import json
import logging
import sys
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

import structlog

from agent_stub.agent import Agent
from agent_stub.applied import AppliedStore
from agent_stub.batches import SequenceStore
from agent_stub.batches import UploadSequence
from agent_stub.channels import ReplicaRotation
from agent_stub.channels import ServerAddressError
from agent_stub.channels import open_channel
from agent_stub.channels import server_target
from agent_stub.clock import PLATFORM_CLOCK
from agent_stub.clock import NoSleepClock
from agent_stub.config import AgentConfig
from agent_stub.durable import StateFileError
from agent_stub.identity import CA_FILE
from agent_stub.identity import EXIT_BAD_INPUT
from agent_stub.identity import EXIT_FAILED
from agent_stub.identity import EnrolmentError
from agent_stub.identity import default_enroll_target
from agent_stub.identity import enrol
from agent_stub.identity import insecure_metadata
from agent_stub.identity import read_ca
from agent_stub.local_state import LocalStateFile
from agent_stub.local_state import NoticeBoard
from agent_stub.notices import NOTIFY_CHOICES
from agent_stub.notices import Notifier
from agent_stub.notices import NotifierSpecError
from agent_stub.notices import notifier_from

# Adds more subcommands to the program's parser (the simulator's ``simulate``).
AddCommands = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


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
    reopen = ReplicaRotation(target, credentials=credentials)
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


def add_server_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        required=True,
        type=server_list,
        help="control server HOST:PORT; replicas: IP:PORT,IP:PORT,... or one DNS name for all",
    )


def build_parser(*more_commands: AddCommands) -> argparse.ArgumentParser:
    """The reference agent's own commands, and ``more_commands``. Each command's
    ``check`` refuses bad input before anything starts; ``func`` runs it."""
    parser = argparse.ArgumentParser(prog="killswitch-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one reference agent")
    add_server_option(run)
    run.add_argument("--agent-id", required=True)
    run.add_argument("--label", action="append", metavar="K=V", help="a label (repeatable)")
    add_ingest_option(run)
    add_notify_option(run, "desktop", "default desktop; a failing one never stops a pause")
    add_identity_options(run, "where the agent keeps its key, certificate and upload sequence")
    run.set_defaults(func=run_one, check=check_identity_options)

    status = sub.add_parser("status", help="print this laptop's capture state, as last applied")
    status.add_argument(
        "--state-dir", type=Path, required=True, metavar="DIR", help="the agent's state directory"
    )
    status.add_argument("--json", action="store_true")
    # It reads its own state file only: nothing to check beyond what argparse does.
    status.set_defaults(func=show_status, check=lambda args: None)
    for add_commands in more_commands:
        add_commands(sub)
    return parser


def fail(message: str, exit_code: int) -> NoReturn:
    sys.stderr.write(f"killswitch-agent: error: {message}\n")
    sys.exit(exit_code)


def main(argv: Sequence[str] | None = None, *more_commands: AddCommands) -> None:
    """The reference agent's commands; the ``killswitch-agent`` program adds the
    simulator's (``simulator.cli.main``)."""
    args = build_parser(*more_commands).parse_args(argv)
    try:
        args.check(args)
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
