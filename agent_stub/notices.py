"""Local notices: the person at the laptop learns of every change of its capture state
(paused, resumed, opted out, lease lost) from the laptop itself, with the reason, the
ticket and who decided.

The notifier is pluggable: the desktop's own (``notify-send`` on Linux, ``osascript``
on macOS, a PowerShell toast on Windows), or one JSON line per notice appended to a
file or written to stdout, for headless runs and tests. A notifier that fails is
logged and ignored: capture-state handling never waits for it or depends on it (the
agent stays fail closed whatever the desktop does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import asdict
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO
from typing import Protocol

import structlog

log = structlog.get_logger("killswitch.agent.notices")

NOTIFY_CHOICES = "file:PATH, stdout or desktop"
TITLE = "killswitch"


class NotifierSpecError(ValueError):
    """``--notify`` names no known backend."""


class CaptureState(StrEnum):
    """What the person at the laptop is told capture is doing: the states a notice
    announces, worded for them rather than as the wire's modes (an opt-out and an incident
    pause are one mode there, and a lapsed lease is none)."""

    PAUSED = "paused"
    RESUMED = "resumed"
    OPTED_OUT = "opted out"
    LEASE_LOST = "lease lost"


@dataclass(frozen=True, slots=True)
class Notice:
    """One change of the capture state, with everything its owner needs to trust it:
    why, under which ticket and who decided, so no notice leaves them guessing."""

    agent_id: str
    state: CaptureState
    reason: str
    ticket: str
    decided_by: str
    epoch: int
    at: float

    def text(self) -> str:
        """One line a person reads: what happened, why, under which ticket, decided by whom."""
        parts = [f"Capture {self.state} on {self.agent_id}: {self.reason}"]
        if self.ticket and self.ticket not in self.reason:
            parts.append(f"ticket {self.ticket}")
        if self.decided_by:
            parts.append(f"decided by {self.decided_by}")
        return "; ".join(parts)

    def json_line(self) -> str:
        return json.dumps({**asdict(self), "text": self.text()}, sort_keys=True) + "\n"


class Notifier(Protocol):
    def show(self, notice: Notice) -> None:
        """Show ``notice``; may raise (the caller logs it and carries on)."""


class LineNotifier:
    """One JSON line per notice, on ``out``; one writer shared by a simulated fleet."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._lock = threading.Lock()

    def show(self, notice: Notice) -> None:
        with self._lock:
            self._out.write(notice.json_line())
            self._out.flush()


class FileNotifier:
    """Appends to ``path``, opened per notice so a rotated or removed file is recreated."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def show(self, notice: Notice) -> None:
        with self._lock, self.path.open("a") as out:
            out.write(notice.json_line())


# Windows: the notice text reaches PowerShell through the environment, never pasted into
# the script (-Command joins every further argument into the script text).
WINDOWS_TEXT_VARIABLE = "KILLSWITCH_NOTICE_TEXT"


def desktop_command(
    notice: Notice, platform: str = sys.platform
) -> tuple[list[str], dict[str, str]]:
    """The desktop's own notifier: an argument list (never through a shell) and the
    environment variables it needs."""
    body = notice.text()
    if platform == "darwin":
        # AppleScript string literals: backslash and double quote escaped.
        quoted = body.replace("\\", "\\\\").replace('"', '\\"')
        return ["osascript", "-e", f'display notification "{quoted}" with title "{TITLE}"'], {}
    if platform.startswith("win"):
        # A BurntToast toast if that module is installed, else a plain message box.
        script = (
            f"$text = $env:{WINDOWS_TEXT_VARIABLE};"
            " if (Get-Module -ListAvailable -Name BurntToast) {"
            f" New-BurntToastNotification -Text '{TITLE}', $text }} else {{"
            " Add-Type -AssemblyName PresentationFramework;"
            f" [System.Windows.MessageBox]::Show($text, '{TITLE}') | Out-Null }}"
        )
        command = ["powershell", "-NoProfile", "-NonInteractive", "-Command", script]
        return command, {WINDOWS_TEXT_VARIABLE: body}
    return ["notify-send", "--app-name", TITLE, TITLE, body], {}


class DesktopNotifier:
    """Starts the platform's notifier and does not wait for it (a hung desktop must
    not hold the agent); its exit status is not read."""

    def __eq__(self, other: object) -> bool:
        """Stateless: any two are the same choice (parsed options compare equal)."""
        return isinstance(other, DesktopNotifier)

    def __hash__(self) -> int:
        return hash(DesktopNotifier)

    def show(self, notice: Notice) -> None:
        command, variables = desktop_command(notice)
        if shutil.which(command[0]) is None:
            raise FileNotFoundError(f"{command[0]} not found: no desktop notice shown")
        subprocess.Popen(
            command,
            env={**os.environ, **variables},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


def notifier_from(spec: str) -> Notifier:
    """``--notify``: ``file:PATH``, ``stdout`` or ``desktop``."""
    if spec == "stdout":
        return LineNotifier(sys.stdout)
    if spec == "desktop":
        return DesktopNotifier()
    kind, _, path = spec.partition(":")
    if kind == "file" and path:
        return FileNotifier(Path(path))
    raise NotifierSpecError(f"bad --notify {spec!r}: expected {NOTIFY_CHOICES}")


def show_safely(notifier: Notifier, notice: Notice) -> None:
    """A notifier's failure is logged, never raised into capture-state handling."""
    try:
        notifier.show(notice)
    except Exception as exc:
        log.warning(
            "notice_not_shown", agent_id=notice.agent_id, state=notice.state, error=repr(exc)
        )
