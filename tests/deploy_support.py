"""What the deploy tests share: where deploy/ is, and parsing command lines with the
real argparse parsers (an unknown flag is named, not just refused)."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from collections.abc import Mapping
from pathlib import Path

from agent_stub import cli as agent_cli
from control import cli as control_cli

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
MANIFEST = KUBERNETES / "killswitch.yaml"
DOCKERFILE = KUBERNETES / "Dockerfile"

# ------------------------------------------------------------------ helpers


def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise AssertionError(f"{parser.prog} has no subcommand {name}")


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def unknown_flags(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """The ``--flags`` in ``argv`` that ``parser`` does not define (values skipped)."""
    known = options(parser)
    unknown: list[str] = []
    words = iter(argv)
    for word in words:
        if not word.startswith("-"):
            continue
        flag, has_value, _ = word.partition("=")
        action = known.get(flag)
        if action is None:
            unknown.append(flag)
        elif action.nargs != 0 and not has_value:
            next(words, None)
    return unknown


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse as the command would, turning argparse's exit into a readable failure."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"{shlex.join(argv)!r} is refused: {errors.getvalue()}") from exc


def parse_as(program: str, argv: list[str]) -> argparse.Namespace:
    """``argv`` (after the program) checked against that program's real parser."""
    parser = {"killswitch": control_cli.build_parser, "killswitch-agent": agent_cli.build_parser}[
        program
    ]()
    command = subcommand(parser, argv[0])
    assert not unknown_flags(argv[1:], command), (
        f"`{program} {argv[0]}` has no {unknown_flags(argv[1:], command)}"
        f" (it has {sorted(options(command))})"
    )
    return parse(parser, argv)


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def quantity(text: str | int) -> float:
    """A Kubernetes quantity (``500m``, ``2``, ``768Mi``, ``1G``) as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    units |= {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match is not None and match[2] in (*units, ""), f"bad quantity {text!r}"
    return float(match[1]) * units.get(match[2], 1)


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())
