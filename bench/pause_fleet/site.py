"""Where one system runs: its servers' ports and files, and the commands that set it up.

The set-up runs the same ``killswitch`` commands an operator runs (``init``, people's
identities, join tokens), so an mTLS run measures the product as it is deployed.
"""

from __future__ import annotations

import shlex
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.pause_fleet.systems import Ports
from bench.pause_fleet.systems import System
from bench.people import issue_person
from bench.procs import BIN
from bench.procs import REPO
from bench.procs import Child
from control.domain.identity import Role


@dataclass(frozen=True, slots=True)
class Site:
    """Where one system runs: its servers' ports and files, and how to (re)start them.

    Replica 0 (the only one unless the product runs on several) is the one the pause
    goes to; every replica has its own data dir (for the CA files) and ports.
    """

    system: System
    slug: str
    ports: tuple[Ports, ...]
    workdir: Path

    def target(self, replica: int = 0) -> str:
        return f"127.0.0.1:{self.ports[replica].grpc}"

    @property
    def targets(self) -> str:
        """Every replica, as the agents are given them."""
        return ",".join(self.target(i) for i in range(len(self.ports)))

    def data_dir(self, replica: int = 0) -> Path:
        return self.workdir / (f"{self.slug}-data" + (f"-{replica}" if replica else ""))

    @property
    def identities(self) -> Path | None:
        """Where the harness's people keep their own keys and certificates (mTLS only)."""
        return self.workdir / f"{self.slug}-people" if self.system.mtls else None

    def start_server(self, paused_epoch: int | None, replica: int = 0) -> Child:
        argv = self.system.server_argv(self.ports[replica], self.data_dir(replica), paused_epoch)
        name = f"{self.slug} server" + (f" {replica}" if len(self.ports) > 1 else "")
        log_name = f"{self.slug}-server" + (f"-{replica}" if replica else "") + ".log"
        return Child(name, argv, self.workdir / log_name, REPO)

    def streams(self, replica: int) -> int:
        """Agent streams the product server ``replica`` serves, from its /metrics."""
        url = f"http://127.0.0.1:{self.ports[replica].http}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith("killswitch_connected_streams "):
                return int(float(line.split()[1]))
        raise RuntimeError(f"no killswitch_connected_streams in {url}")


def issue_identity(site: Site, name: str, role: str, database: str) -> list[str]:
    """A person's own key and request, signed by the administrator: the commands run."""
    assert site.identities is not None
    return issue_person(
        BIN / "killswitch",
        site.data_dir(),
        name,
        Role(role),
        site.identities / name,
        database=database,
    )


def run_cli(argv: list[str]) -> str:
    """A `killswitch` command as an operator runs it; its stdout."""
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout
