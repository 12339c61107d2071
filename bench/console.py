"""What a benchmark says while it runs: progress on stderr, and the command it ran.

Progress goes to stderr so that stdout holds only the report, ready to paste into
BENCHMARKS.md; the report opens with the exact command that produced it.
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from bench.procs import REPO


def log(message: str) -> None:
    """One timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def this_command(module: str) -> str:
    """How this run was started (``python -m module ...``), relative to the repository."""
    return shlex.join([os.path.relpath(sys.executable, REPO), "-m", module, *sys.argv[1:]])
