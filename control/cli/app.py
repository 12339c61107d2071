"""``killswitch``: the parser, ``main`` and the one place errors become messages and exit codes.

Every command module adds its own commands (``add_commands``); this assembles them in
the order ``killswitch --help`` lists them, runs the chosen handler, and turns whatever
it raises into one line on stderr and the exit code scripts rely on
(``control.cli.exit_codes``).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from control.cli import audit
from control.cli import certs
from control.cli import fleet
from control.cli import identity
from control.cli import pause_resume
from control.cli import report
from control.cli import runbook
from control.cli import self_service
from control.cli import serve
from control.cli.exit_codes import EXIT_BAD_INPUT
from control.cli.exit_codes import EXIT_FAILED
from control.cli.exit_codes import EXIT_INTERRUPTED
from control.cli.exit_codes import EXIT_STORE_UNAVAILABLE
from control.cli.exit_codes import EXIT_UNREACHABLE
from control.cli.options import connect
from control.errors import InvalidInput
from control.errors import KillswitchError
from control.errors import ServerStoreUnavailable
from control.errors import ServerTimedOut
from control.errors import ServerUnreachable
from control.ingest.cli import add_ingest_parser

# What a person can do about a server that cannot be reached, after the reason.
UNREACHABLE_HINT = "; is `killswitch serve` running? Set --server or KILLSWITCH_SERVER"


class OneLineErrors(argparse.ArgumentParser):
    """Usage mistakes are one line too, like every other error (``--help`` has the rest)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see `{self.prog} --help`)", EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    """Every command's parser. Options take their defaults from ``KILLSWITCH_*`` variables,
    so a parser is reused only while those are unchanged (``_parser_for``)."""
    return _parser_for(
        tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("KILLSWITCH_")))
    )


@functools.lru_cache(maxsize=16)
def _parser_for(environment: tuple[tuple[str, str], ...]) -> argparse.ArgumentParser:
    """Built once per environment: a console script runs ``main`` once, but a program that
    calls it again and again (the test suite runs thousands of commands in process) paid
    9 ms a call to build the same 1,400 options anew. ``environment`` is the cache key
    only; a parser holds no other state between ``parse_args`` calls."""
    del environment
    parser = OneLineErrors(
        prog="killswitch", description="Pause capture across the fleet and prove it stopped."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_ingest_parser(sub)
    serve.add_command(sub)
    pause_resume.add_commands(sub)
    report.add_commands(sub)
    runbook.add_commands(sub)
    fleet.add_commands(sub)
    audit.add_commands(sub)
    certs_group = certs.add_commands(sub)
    identity.add_commands(sub, certs_group)
    self_service.add_commands(sub)
    return parser


def fail(message: str, exit_code: int) -> NoReturn:
    sys.stderr.write(f"killswitch: error: {message}\n")
    sys.exit(exit_code)


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: run one command, exit with its code or one line of why not."""
    args = build_parser().parse_args(argv)
    try:
        if args.local:
            sys.exit(args.handler(args))
        sys.exit(args.handler(args, connect(args)))
    except ServerTimedOut as exc:
        fail(str(exc), EXIT_UNREACHABLE)
    except ServerUnreachable as exc:
        fail(f"{exc}{UNREACHABLE_HINT}", EXIT_UNREACHABLE)
    except ServerStoreUnavailable as exc:
        fail(str(exc), EXIT_STORE_UNAVAILABLE)
    except InvalidInput as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    except KillswitchError as exc:
        fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        sys.exit(EXIT_FAILED)
