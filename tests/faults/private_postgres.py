"""A PostgreSQL cluster of one test's own: made by ``initdb`` in a temporary directory,
on a port of its own, stopped and removed afterwards.

The fault test that restarts PostgreSQL mid-pause used to restart the machine's cluster,
which every other PostgreSQL test shares: it had to run alone, after the parallel part
of the suite, and its minute counted whole in the suite's wall time. On a cluster of
its own it restarts nobody else's database, and runs beside the rest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.conftest import missing_tool

POSTGRES_LIBS = Path("/usr/lib/postgresql")
# PostgreSQL refuses to run as root; as root the cluster belongs to this system user.
OWNER = "postgres"


@dataclass(frozen=True)
class PrivatePostgres:
    data_dir: Path
    port: int
    bin_dir: Path

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def restart(self) -> None:
        """A fast restart (every session cut), back once it accepts connections."""
        self._ctl("restart", "-m", "fast")

    def start(self) -> None:
        self._ctl("start")

    def stop(self) -> None:
        self._ctl("stop", "-m", "immediate")

    def _ctl(self, *action: str) -> None:
        options = f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1"
        _run(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l",
            str(self.data_dir / "server.log"), "-o", options, "-w", "-t", "60", *action,
        )  # fmt: skip


def _run(*argv: str) -> None:
    as_owner = ["runuser", "-u", OWNER, "--"] if os.geteuid() == 0 else []
    done = subprocess.run(
        [*as_owner, *argv], check=False, capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])}: {(done.stderr or done.stdout).strip()}")


def _bin_dir() -> Path:
    versions = sorted(POSTGRES_LIBS.glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not versions:
        missing_tool(f"no PostgreSQL server binaries under {POSTGRES_LIBS}")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        missing_tool("as root, a private PostgreSQL needs runuser")
    return versions[-1].parent


@pytest.fixture
def private_postgresql() -> Iterator[PrivatePostgres]:
    bin_dir = _bin_dir()
    # Not under pytest's temporary directory: as root that is private to root, and the
    # cluster's owner could not reach its own files.
    data_dir = Path(tempfile.mkdtemp(prefix="killswitch-postgresql-"))
    if os.geteuid() == 0:
        shutil.chown(data_dir, OWNER)
    _run(
        str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust",
        "-E", "UTF8", "--no-sync",
    )  # fmt: skip
    cluster = PrivatePostgres(data_dir, free_port(), bin_dir)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
