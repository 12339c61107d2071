"""Fault suite: the SQLite store cannot write. A real server, the real simulator, and
its ground truth: the fleet fails closed, and an operator's pause still commits.

The data dir is a small tmpfs that the test fills (disk full), or an ext4 image the
kernel turns read-only under the open database, as ``errors=remount-ro`` does on a
failing disk (``mount -o remount,ro`` refuses while the database is open for writing).
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from control.plane import STORE_PROBE_SECONDS
from control.store import causes
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulator
from tests.conftest import wait_capturing
from tests.conftest import wait_for
from tests.disks import fill
from tests.disks import mount_ext4
from tests.disks import mount_tmpfs
from tests.disks import need_root
from tests.disks import turn_read_only
from tests.disks import unmount
from tests.faults.checker import Pause
from tests.faults.checker import check
from tests.faults.checker import read_truth

AGENTS = 8
LEASE_TTL = 5.0  # conftest.FAST_TIMINGS
# A store fault is known at the next beat at the latest; from then no lease is granted.
DETECTED_WITHIN = STORE_PROBE_SECONDS + 0.5
EXIT_STORE_UNAVAILABLE = 5


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points to unmount at the end (after the server is stopped, which the
    start_server fixture, set up earlier, does later: so unmount lazily)."""
    points: list[Path] = []
    yield points
    for point in points:
        unmount(point)


def start(data_dir: Path, started: list[ServerProcess]) -> ServerProcess:
    server = ServerProcess(data_dir, [])
    started.append(server)
    server.start()
    return server


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


def readyz(server: ServerProcess) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{server.http_port}/readyz", timeout=2
        ) as reply:
            return reply.status, reply.read().decode().strip()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode().strip()


def store_metrics(server: ServerProcess) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.findall(r'^(killswitch_store_\w+(?:\{cause="\w+"\})?) (\S+)$', text, re.M)
    return {name: float(value) for name, value in found}


def assert_store_unwritable(server: ServerProcess, label: str) -> None:
    """The server's metrics say its store cannot write, and why (the cause's label)."""
    unwritable = {
        "killswitch_store_writable": 0.0,
        f'killswitch_store_unwritable_cause{{cause="{label}"}}': 1.0,
    }
    assert store_metrics(server).items() >= unwritable.items()


def wait_unready(server: ServerProcess, cause: str) -> float:
    wait_for(lambda: readyz(server) == (503, f"not ready: {cause}"), 10, f"readyz: {cause}")
    return time.time()


def judge(fault: str, truth_path: Path, pauses: list[Pause], cli: Cli) -> None:
    """Every agent stopped in time, by the truth, and the server says so too (an allowed
    agent whose lease ran out is RESUME_PENDING, not CAPTURING)."""
    truth = read_truth(truth_path, newer_than=time.time())
    assert all(not row["capturing"] for row in truth["agents"]), "an agent still captures"
    check(fault, truth, pauses, lease_ttl=LEASE_TTL, server_states=[cli.agents()]).assert_holds()


FleetOn = Callable[[Callable[[Path], Path]], tuple[ServerProcess, Cli, Path]]


@pytest.fixture
def capturing_fleet(
    tmp_path: Path,
    mounts: list[Path],
    servers: list[ServerProcess],
    simulate: Callable[..., Simulator],
) -> FleetOn:
    """Given how to mount the data dir: a server on it and a simulated fleet capturing,
    with its truth file."""
    need_root()

    def on(mount: Callable[[Path], Path]) -> tuple[ServerProcess, Cli, Path]:
        mounts.append(data_dir := mount(tmp_path / "data-store"))
        server = start(data_dir, servers)
        cli = Cli(server)
        truth_path = tmp_path / "truth.json"
        simulate(server, AGENTS, "--truth", str(truth_path))
        wait_capturing(cli, AGENTS)
        assert readyz(server) == (200, "ready")
        return server, cli, truth_path

    return on


def test_disk_full_fails_closed_and_a_pause_commits_from_the_reserve(
    capturing_fleet: FleetOn,
) -> None:
    server, cli, truth_path = capturing_fleet(mount_tmpfs)

    # (a) The disk fills while agents capture: no lease is granted or renewed.
    fill(server.data_dir)
    filled_at = time.time()
    wait_unready(server, causes.DISK_FULL)
    assert time.time() - filled_at < DETECTED_WITHIN + 1
    assert_store_unwritable(server, "disk_full")
    assert f'"cause": "{causes.DISK_FULL}"' in server.log() and '"event": "store_lost"' in (
        server.log()
    )
    # An operator's write that is not a pause: refused, saying why, in one line.
    refused = cli.run("enroll-token", "create", "--uses", "1")
    assert refused.returncode == EXIT_STORE_UNAVAILABLE, refused.stderr
    assert refused.stderr.strip().endswith(causes.DISK_FULL) and refused.stderr.count("\n") == 1
    time.sleep(max(0.0, filled_at + DETECTED_WITHIN + LEASE_TTL + 2.5 - time.time()))
    # For the checker the store fault is the pause: the moment it was known.
    judge("SQLite disk full", truth_path, [Pause(filled_at + DETECTED_WITHIN)], cli)

    # (b) An operator's pause on that full disk commits, from the reserve.
    hold_id = cli.pause("--all", "--reason", "disk full drill")
    (hold,) = cli.json("holds")["holds"]
    assert hold["id"] == hold_id
    assert not (server.data_dir / "killswitch.reserve").exists(), "the reserve was spent"
    wait_unready(server, causes.ON_RESERVE)
    committed_at = datetime.fromisoformat(hold["created_at"]).timestamp()
    time.sleep(max(0.0, committed_at + LEASE_TTL + 2.5 - time.time()))
    judge("SQLite disk full, paused", truth_path, [Pause(committed_at)], cli)

    # (c) Space comes back: healthy, the reserve is back, and resumed agents capture.
    (server.data_dir / "fill").unlink()
    wait_for(lambda: readyz(server) == (200, "ready"), 10, "ready again")
    assert (server.data_dir / "killswitch.reserve").exists()
    assert store_metrics(server)["killswitch_store_writable"] == 1.0
    assert '"event": "store_recovered"' in server.log()
    cli.resume(hold_id)
    wait_capturing(cli, AGENTS)

    def all_capture() -> bool:
        truth = read_truth(truth_path, newer_than=time.time())
        return all(row["capturing"] for row in truth["agents"])

    wait_for(all_capture, 20, "every agent capturing again, by the truth")


def test_a_file_system_turned_read_only_fails_closed(capturing_fleet: FleetOn) -> None:
    server, cli, truth_path = capturing_fleet(mount_ext4)

    turn_read_only(server.data_dir)
    broken_at = time.time()
    wait_unready(server, causes.READ_ONLY_FS)
    assert_store_unwritable(server, "read_only_fs")
    # No reserve helps on a read-only disk: the pause is refused, saying why, and the
    # fleet stops anyway, because no lease is granted.
    refused = cli.run("pause", "--all", "--reason", "read-only drill")
    assert refused.returncode == EXIT_STORE_UNAVAILABLE, refused.stderr
    assert causes.READ_ONLY_FS in refused.stderr
    time.sleep(max(0.0, broken_at + DETECTED_WITHIN + LEASE_TTL + 2.5 - time.time()))
    judge("SQLite read-only file system", truth_path, [Pause(broken_at + DETECTED_WITHIN)], cli)
