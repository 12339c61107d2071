"""The tests' in-process CLI (``tests.inprocess``) gives what the installed script gives."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN
from tests.inprocess import run_killswitch

KILLSWITCH = str(BIN / "killswitch")


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["pause", "--all"], {}),  # argparse: exit 2, one line
        (["no-such-command"], {}),
        (["status"], {"KILLSWITCH_SERVER": "127.0.0.1:1"}),  # no identity: exit 2
        (["status", "--identity", "/nonexistent"], {}),  # a bad identity directory
        (["runbook", "check", "/nonexistent.yaml"], {}),
    ],
)
def test_in_process_gives_what_the_script_gives(args: list[str], env: dict[str, str]) -> None:
    script = subprocess.run(
        [KILLSWITCH, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )
    inside = run_killswitch([KILLSWITCH, *args], env, timeout=60)
    assert script.returncode != 0, script
    assert (inside.returncode, inside.stdout, inside.stderr) == (
        script.returncode,
        script.stdout,
        script.stderr,
    )


def test_the_environment_and_umask_are_put_back(tmp_path: Path) -> None:
    assert "KILLSWITCH_IDENTITY" not in os.environ
    umask = os.umask(0o022)
    try:
        out = tmp_path / "me"
        args = ["identity", "request", "--name", "ic-9", "--role", "incident-commander"]
        done = run_killswitch(
            [KILLSWITCH, *args, "--out", str(out)], {"KILLSWITCH_IDENTITY": "x"}, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("-----BEGIN CERTIFICATE REQUEST-----"), done.stdout
        assert "your key is" in done.stderr
        assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
        assert os.umask(0o022) == 0o022, "the CLI's owner-only umask stayed behind"
    finally:
        os.umask(umask)
    assert "KILLSWITCH_IDENTITY" not in os.environ


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def test_the_timeout_still_bounds_a_call(silent_server: str) -> None:
    args = ["status", "--server", silent_server, "--insecure", "--as", "ic-1:incident-commander"]
    with pytest.raises(subprocess.TimeoutExpired):
        run_killswitch([KILLSWITCH, *args], {}, timeout=0.5)
