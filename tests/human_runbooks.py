"""Reads the Markdown runbooks in runbooks/ and turns each one into the bash script it describes.

The conventions (documented for humans in runbooks/README.md):

- every command lives in a fenced block whose language is ``sh``; the test runs those blocks,
  in order, as one ``set -euo pipefail`` bash script, so variables carry across blocks;
- the fence's info string may carry attributes in braces: ``sh {as=approver-1}`` runs the
  block as another person (``KILLSWITCH_IDENTITY`` switches to that identity for the block),
  ``sh {background}`` starts a long-running command such as ``killswitch serve`` and goes on,
  ``sh {expect-exit=4}`` is one check that is meant to fail with that exit code;
- other fences (``text``, ``json``) are examples and never run; ``bash``, ``shell`` and
  ``console`` fences are refused, so that no command hides from the test.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNBOOKS = REPO / "runbooks"
DEFAULT_IDENTITY = "ic-1"
# The people the test server issues identities to: the only names `as=` may use.
IDENTITIES = ("ic-1", "approver-1", "approver-2", "sre-1", "automation-1", "employee-1")
RUNNABLE = "sh"
# Fence languages that look runnable but would escape the test.
REFUSED_LANGUAGES = {"bash", "shell", "console", "zsh", "shell-session"}
ATTRIBUTES = {"as", "background", "expect-exit"}
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
INLINE_CODE = re.compile(r"(?<!`)(?P<ticks>`+)(?!`)(?P<code>.+?)(?<!`)(?P=ticks)(?!`)")
PROMPT = re.compile(r"^\$\s+")


class RunbookError(ValueError):
    """A runbook breaks the conventions; the message names the file and line."""


@dataclass(frozen=True)
class Block:
    """One fenced code block."""

    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    attributes: dict[str, str]
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.language == RUNNABLE

    @property
    def identity(self) -> str:
        return self.attributes.get("as", DEFAULT_IDENTITY)

    @property
    def background(self) -> bool:
        return "background" in self.attributes

    @property
    def expected_exit(self) -> int | None:
        value = self.attributes.get("expect-exit")
        return None if value is None else int(value)


@dataclass
class Runbook:
    path: Path
    blocks: list[Block] = field(default_factory=list)
    # Markdown outside fenced blocks, as (line number, text).
    prose: list[tuple[int, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def runnable(self) -> list[Block]:
        return [b for b in self.blocks if b.runnable]

    def commands_shown(self) -> list[tuple[int, str]]:
        """Every `killswitch ...` a reader may copy from outside the runnable blocks:
        inline code spans anywhere in the prose, and lines of example (non-sh) blocks."""
        shown: list[tuple[int, str]] = []
        for number, line in self.prose:
            for match in INLINE_CODE.finditer(line):
                code = match.group("code").strip()
                if code.startswith("killswitch "):
                    shown.append((number, code))
            stripped = PROMPT.sub("", line.strip())
            if stripped.startswith("killswitch "):
                shown.append((number, stripped))
        for block in self.blocks:
            if block.runnable:
                continue
            for offset, line in enumerate(block.text.splitlines(), start=1):
                stripped = PROMPT.sub("", line.strip())
                if stripped.startswith("killswitch "):
                    shown.append((block.line + offset, stripped))
        return shown


def parse_info(info: str, where: str) -> tuple[str, dict[str, str]]:
    """``sh {as=approver-1 expect-exit=4}`` -> ("sh", {"as": "approver-1", "expect-exit": "4"})."""
    match = re.fullmatch(r"\s*(?P<lang>[^\s{]*)\s*(?:\{(?P<attrs>[^}]*)\})?\s*", info)
    if match is None:
        raise RunbookError(f"{where}: cannot read the fence info string {info!r}")
    attributes: dict[str, str] = {}
    for item in (match.group("attrs") or "").split():
        key, sep, value = item.partition("=")
        if key not in ATTRIBUTES:
            raise RunbookError(f"{where}: unknown block attribute {key!r} (known: {ATTRIBUTES})")
        if key in attributes:
            raise RunbookError(f"{where}: attribute {key!r} given twice")
        if key == "background" and sep:
            raise RunbookError(f"{where}: 'background' takes no value")
        if key != "background" and not value:
            raise RunbookError(f"{where}: attribute {key!r} needs a value ({key}=...)")
        attributes[key] = value
    return match.group("lang"), attributes


def parse(path: Path) -> Runbook:
    runbook = Runbook(path)
    lines = path.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            runbook.prose.append((index + 1, lines[index]))
            index += 1
            continue
        start, fence = index, opening.group("fence")
        where = f"{path.name}:{start + 1}"
        language, attributes = parse_info(opening.group("info"), where)
        body: list[str] = []
        index += 1
        while index < len(lines) and not re.match(
            rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[index]
        ):
            body.append(lines[index])
            index += 1
        if index == len(lines):
            raise RunbookError(f"{where}: code block never closed")
        index += 1  # the closing fence
        block = Block(path, start + 1, language, attributes, "\n".join(body) + "\n")
        check_block(block)
        runbook.blocks.append(block)
    return runbook


def check_block(block: Block) -> None:
    if block.language in REFUSED_LANGUAGES:
        raise RunbookError(
            f"{block.where}: a {block.language!r} block would not be run by the test;"
            f" use ```{RUNNABLE} for commands and ```text for output"
        )
    if block.attributes and not block.runnable:
        raise RunbookError(f"{block.where}: attributes only apply to ```{RUNNABLE} blocks")
    if block.identity not in IDENTITIES:
        raise RunbookError(f"{block.where}: as={block.identity}: not one of {IDENTITIES}")
    expected = block.attributes.get("expect-exit")
    if expected is not None and not (expected.isdigit() and 0 < int(expected) < 256):
        raise RunbookError(f"{block.where}: expect-exit={expected}: an exit code from 1 to 255")
    if block.background and expected is not None:
        raise RunbookError(f"{block.where}: a background block has no exit code to expect")


def runbooks() -> list[Runbook]:
    """Every runbook but the index."""
    return [parse(p) for p in sorted(RUNBOOKS.glob("*.md")) if p.name != "README.md"]


def normalise(text: str) -> str:
    return " ".join(text.split())


def command_is_run(command: str, runnable_text: str) -> bool:
    """Does ``command`` (whitespace aside) occur in the runnable text, ending at a word end?

    So `killswitch agents --state VIOLATION` is covered by a block that runs
    `killswitch agents --state VIOLATION --json`, but `killswitch me` is not covered
    by `killswitch metrics`.
    """
    pattern = re.escape(normalise(command)) + r"(?![\w-])"
    return re.search(pattern, normalise(runnable_text)) is not None


def script(runbook: Runbook, identities: Path, background_log: Path) -> str:
    """The runbook's sh blocks, in order, as one bash script, each as its own person.

    ``: '### file:line as NAME'`` lines show in the xtrace, so a failure's transcript says
    which block it came from.
    """
    out = [
        "set -euo pipefail",
        "PS4='+ '",
        "set -x",
    ]
    for block in runbook.runnable:
        identity = shlex.quote(str(identities / block.identity))
        out.append(f": {shlex.quote(f'### {block.where} as {block.identity}')}")
        out.append(f"export KILLSWITCH_IDENTITY={identity}")
        body = block.text.rstrip("\n")
        if block.background:
            out.append(f"( {body}\n) >>{shlex.quote(str(background_log))} 2>&1 &")
        elif block.expected_exit is not None:
            expected = block.expected_exit
            out.append("set +e")
            out.append(f"( set -e\n{body}\n)")
            out.append("runbook_rc=$?")
            out.append("set -e")
            out.append(
                f'if [ "$runbook_rc" -ne {expected} ]; then echo "{block.where}: expected exit'
                f' {expected}, got $runbook_rc" >&2; exit 1; fi'
            )
        else:
            out.append(body)
    out.append(": '### end of runbook'")
    return "\n".join(out) + "\n"
