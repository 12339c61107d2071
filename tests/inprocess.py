"""`killswitch ARGS` run inside the test process, as a subprocess would run it.

A subprocess costs a Python start-up and the CLI's imports (0.5-1 s on a loaded machine) per
call, and the suite makes thousands of calls. Here the console script's entry point,
``control.cli.app.main``, runs in a worker thread instead, and everything a test can observe is
what the subprocess gave: the same environment variables, stdout, stderr, the exit code
(``SystemExit`` included, argparse's exit 2 too; an uncaught exception is a traceback on
stderr and exit 1, as Python does) and a ``subprocess.TimeoutExpired`` past ``timeout``.

What the CLI changes for the whole process, the environment and the umask, is put back
after each call. Those are process-wide, so one call runs in process at a time: a call
made while another is running (two operators racing) runs as a real subprocess instead,
still at the same time as the other. tests/test_cli_errors.py runs the installed
`killswitch` script itself, and servers are `killswitch serve` in a subprocess unless a
test runs one in process (tests/inprocess_server.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any
from typing import TextIO
from typing import cast

_ONE_AT_A_TIME = threading.Lock()
# The worker thread's (stdout, stderr) buffers while it runs the CLI.
_ROUTE = threading.local()


class _PerThread:
    """``sys.stdout`` or ``sys.stderr`` during a call: the CLI thread writes to its buffer,
    any other thread (a test's HTTP server logging, say) to the stream this replaced."""

    def __init__(self, which: int, replaced: TextIO) -> None:
        self._which = which
        self._replaced = replaced

    def __getattr__(self, name: str) -> Any:
        buffers: tuple[TextIO, TextIO] | None = getattr(_ROUTE, "buffers", None)
        return getattr(self._replaced if buffers is None else buffers[self._which], name)


def run_killswitch(
    command: list[str], env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """``command``, the `killswitch` script and its arguments, with ``env`` added to the
    environment."""
    if not _ONE_AT_A_TIME.acquire(blocking=False):
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            timeout=timeout,
            check=False,
        )
    try:
        return _in_process(command, env, timeout)
    finally:
        _ONE_AT_A_TIME.release()


def _in_process(
    command: list[str], env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    from control.cli import app

    out, err = io.StringIO(), io.StringIO()
    codes: list[int] = []

    def call() -> None:
        _ROUTE.buffers = (out, err)
        try:
            codes.append(_exit_code(app.main, command[1:]))
        finally:
            _ROUTE.buffers = None

    with _environment(env), _umask_kept(), _streams_routed():
        worker = threading.Thread(target=call, name="killswitch-cli", daemon=True)
        worker.start()
        worker.join(timeout)
    if worker.is_alive():
        raise subprocess.TimeoutExpired(command, timeout, out.getvalue(), err.getvalue())
    return subprocess.CompletedProcess(command, codes[0], out.getvalue(), err.getvalue())


def _exit_code(main: Any, argv: list[str]) -> int:
    """What the interpreter would exit with after ``main(argv)``."""
    try:
        main(argv)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _umask_kept() -> Iterator[None]:
    """`identity request` and `certs issue` set an owner-only umask, for their process."""
    umask = os.umask(0o077)
    os.umask(umask)
    try:
        yield
    finally:
        os.umask(umask)


@contextlib.contextmanager
def _streams_routed() -> Iterator[None]:
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout = cast(TextIO, _PerThread(0, stdout))
    sys.stderr = cast(TextIO, _PerThread(1, stderr))
    try:
        yield
    finally:
        sys.stdout, sys.stderr = stdout, stderr
