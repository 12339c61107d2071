"""A `killswitch serve` run inside the test process: ``control.server.running_server`` on
an event loop of its own, in a thread of its own.

It starts from the very arguments the subprocess is given (``ServerProcess.serve_args``),
turned into settings where `serve` turns them (``settings_from_args``), so a test cannot
tell the two apart through the server's ports. It saves the subprocess's Python start-up
and imports, and a failure to start is the server's own exception, not a log to read. What
only a process has is not here: no SIGKILL (``kill9``), no log file (the server logs into
the test's captured output), and the test process's umask and garbage collector stay as
they were. tests/test_cli_errors.py and tests/test_deploy.py keep running the real script.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

from control.cli.app import build_parser
from control.cli.serve import settings_from_args
from control.server import RunningServer
from control.server import running_server
from tests.conftest import STARTUP_TIMEOUT
from tests.conftest import ServerProcess
from tests.conftest import wait_for

# How long a stop may take: the gRPC grace, the plane's last flush, the store's close.
STOP_TIMEOUT = 30.0


class InProcessServer(ServerProcess):
    running: RunningServer

    def start(self) -> None:
        if self.secure and not self.ca_path.exists():
            self.initialise()
        args = build_parser().parse_args(["serve", *self.serve_args()])
        settings = settings_from_args(args)
        self._loop = asyncio.new_event_loop()
        self._stopping = asyncio.Event()
        started: Future[RunningServer] = Future()

        async def run() -> None:
            try:
                async with running_server(settings) as running:
                    started.set_result(running)
                    await self._stopping.wait()
            except BaseException as exc:
                if started.done():
                    raise
                started.set_exception(exc)

        self._thread = threading.Thread(
            target=self._loop.run_until_complete,
            args=(run(),),
            name=f"server-{self.grpc_port}",
            daemon=True,
        )
        self._thread.start()
        self.running = started.result(timeout=STARTUP_TIMEOUT)
        wait_for(self.ready, STARTUP_TIMEOUT, "server readiness")

    def ready(self) -> bool:
        if not self._thread.is_alive():
            raise AssertionError("the in-process server stopped")
        return self.answers_ready()

    def stop(self) -> None:
        if not hasattr(self, "_thread") or not self._thread.is_alive():
            return
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(STOP_TIMEOUT)
        if self._thread.is_alive():
            raise AssertionError(f"the in-process server did not stop within {STOP_TIMEOUT} s")
        self._loop.close()

    def kill9(self) -> None:
        raise NotImplementedError("an in-process server cannot be killed: use start_server")

    def log(self) -> str:
        return "(in process: the server logged into the test's captured output)"
