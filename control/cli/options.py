"""The flags commands share, the argument types that check them, and the client they set up.

A command that talks to the server is registered with ``add_command``: it gets
``--server``, ``--identity``, ``--insecure`` and ``--as``, and its handler is called with
``(args, client)``. A local command (``local=True``) is called with ``args`` alone.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from typing import TypeVar

from control.client import Credentials
from control.client import OperatorClient
from control.errors import InvalidInput
from control.errors import KillswitchError
from control.pki import load_identity
from control.settings import DEFAULT_GRPC_ADDRESS

# Where `killswitch serve` listens unless told otherwise.
DEFAULT_SERVER = DEFAULT_GRPC_ADDRESS

# The handler of a command that talks to the server.
Handler = Callable[[argparse.Namespace, OperatorClient], int]

T = TypeVar("T")


# ------------------------------------------------------------------ argument types


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 86_400 * 365:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of at least 1")
    return int(text)


def parse_argument(
    parse: Callable[[str], T],
    text: str,
    error: type[Exception],
    describe: Callable[[Exception], str] = str,
) -> T:
    """``parse(text)`` inside an argument type: the parser's own ``error`` becomes a usage
    error (exit 2, its message after the option's name), not argparse's bare "invalid
    value" nor a traceback."""
    try:
        return parse(text)
    except error as exc:
        raise argparse.ArgumentTypeError(describe(exc)) from None


# ------------------------------------------------------------------ shared flags


def add_wait_options(parser: argparse.ArgumentParser, until: str) -> None:
    parser.add_argument("--wait", action="store_true", help=f"wait {until}")
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=300.0,
        help="seconds to wait with --wait, then exit 3 (default 300)",
    )


def add_database_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--database",
        default=os.environ.get("KILLSWITCH_DATABASE", ""),
        metavar="URL",
        help=f"postgresql://USER@HOST:PORT/DB: {what} (env KILLSWITCH_DATABASE;"
        " default SQLite in the data dir)",
    )


def add_quiet_option(parser: argparse.ArgumentParser, prints: str) -> None:
    """For scripts and runbooks: ``HOLD=$(killswitch pause ... -q)``."""
    parser.add_argument(
        "-q", "--quiet", action="store_true", help=f"print only {prints} (reports go to stderr)"
    )


def add_client_options(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--server",
        default=env("KILLSWITCH_SERVER", DEFAULT_SERVER),
        help="control server HOST:PORT (env KILLSWITCH_SERVER; default %(default)s)",
    )
    parser.add_argument(
        "--identity",
        default=env("KILLSWITCH_IDENTITY", ""),
        metavar="DIR",
        help="your identity directory: cert.pem, key.pem, ca.pem (env KILLSWITCH_IDENTITY)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="talk to a `serve --insecure` development server, without TLS",
    )
    parser.add_argument(
        "--as",
        dest="as_identity",
        default=env("KILLSWITCH_AS", ""),
        metavar="NAME:ROLE",
        help="with --insecure only: the identity you claim (env KILLSWITCH_AS)",
    )


# ------------------------------------------------------------------ registering commands


def add_command(
    parent: Any, name: str, help_text: str, handler: Handler
) -> argparse.ArgumentParser:
    """A command that talks to the server, under ``parent`` (a subparsers action)."""
    parser: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text)
    add_client_options(parser)
    parser.set_defaults(handler=handler, local=False)
    return parser


def add_group(sub: Any, name: str, help_text: str) -> Any:
    """A command with commands of its own (``killswitch requests list``); its subparsers."""
    parser = sub.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


# ------------------------------------------------------------------ the client the flags name


def connect(args: argparse.Namespace) -> OperatorClient:
    """The client ``--server``, ``--identity`` or ``--insecure --as`` describe."""
    return OperatorClient(args.server, _credentials(args))


def _credentials(args: argparse.Namespace) -> Credentials:
    if args.insecure:
        if not args.as_identity:
            raise InvalidInput(
                "--insecure needs --as NAME:ROLE (or KILLSWITCH_AS): who you claim to be"
            )
        return Credentials(insecure_claim=args.as_identity)
    if not args.identity:
        raise InvalidInput(
            "no identity: pass --identity DIR or set KILLSWITCH_IDENTITY"
            " (`killswitch identity request`, then an administrator's `certs issue`)"
        )
    try:
        return Credentials(identity=load_identity(Path(args.identity)))
    except KillswitchError as exc:
        raise InvalidInput(f"bad --identity: {exc}") from None
