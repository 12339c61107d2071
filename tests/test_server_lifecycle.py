"""The server in process (``running_server``): it binds, serves, and stops what it started,
also when its start fails half-way."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from control.errors import KillswitchError
from control.server import running_server
from control.settings import ServerSettings
from tests.conftest import free_port


def _insecure(data_dir: Path, http_port: int = 0) -> ServerSettings:
    return ServerSettings(
        data_dir=data_dir,
        grpc_address=f"127.0.0.1:{free_port()}",
        http_address=f"127.0.0.1:{http_port}",
        insecure=True,
    )


def _ready(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
        return int(response.status)


def test_a_server_in_process_gives_its_bound_ports_and_answers_on_them(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_server(_insecure(tmp_path)) as server:
            assert server.http_port != 0  # asked for 0: the port it got
            assert server.enroll_port is None  # --insecure: no enrolment port
            assert await asyncio.to_thread(_ready, server.http_port) == 200
            with socket.create_connection(("127.0.0.1", server.grpc_port), timeout=5):
                pass

    asyncio.run(scenario())


def test_a_failed_start_leaves_nothing_running(tmp_path: Path) -> None:
    """The metrics port is taken: the HTTP server and the store, started before it, are
    stopped again, so the same settings (the same HTTP port) start once it is free."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics = f"127.0.0.1:{taken.getsockname()[1]}"
        settings = replace(_insecure(tmp_path, free_port()), metrics_address=metrics)

        async def refused() -> None:
            async with running_server(settings):
                raise AssertionError("started on a taken port")

        with pytest.raises(KillswitchError, match="cannot listen"):
            asyncio.run(refused())

    async def started() -> int:
        async with running_server(settings) as server:
            return await asyncio.to_thread(_ready, server.http_port)

    assert asyncio.run(started()) == 200
