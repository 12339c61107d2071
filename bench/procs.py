"""Child processes for the benchmark: start, observe (/proc), and always clean up.

Every child is registered so an exception, Ctrl-C or SIGTERM anywhere in the
benchmark still kills it; a leaked 10k-connection fleet would skew the next run.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import FrameType

# Children run from the repository root, with the commands of this interpreter's venv.
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_live: list[Child] = []


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Child:
    """One subprocess whose stdout and stderr go to a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        with log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd
            )
        _live.append(self)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def rss_kib(self) -> int:
        """Resident set size (VmRSS) in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"{self.name}: no VmRSS in /proc/{self.pid}/status")

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far (all threads)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def kill9(self) -> None:
        """SIGKILL and reap: the crash the reconnect measurement simulates."""
        if self.alive():
            self._proc.kill()
        self._proc.wait(timeout=30)
        if self in _live:
            _live.remove(self)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.alive():
            self._proc.terminate()
            try:
                self._proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc.wait(timeout=30)
        if self in _live:
            _live.remove(self)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def log_summary(path: Path) -> str:
    """What a product process logged (JSON, at --log-level warning): count per level and event."""
    counts: Counter[str] = Counter()
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "unreadable"
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            counts["(not JSON)"] += 1
            continue
        if isinstance(entry, dict):
            counts[f"{entry.get('level', '?')} {entry.get('event', '?')}"] += 1
    return ", ".join(f"{k} x{n}" for k, n in counts.most_common()) or "empty"


def stop_all() -> None:
    """Kill every child still running (newest first: fleets before their servers)."""
    for child in reversed(list(_live)):
        child.stop(grace=2.0)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    """Make SIGTERM unwind like Ctrl-C, and kill leftovers at interpreter exit."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    atexit.register(stop_all)
