"""The drill's processes: the control server, the sink (gateway or bare), the fleet.

One Python process holding 10,000 agents fills a core before it offers their upload
rate, so the fleet is split over ``--fleet-processes`` simulators, each with its own
id prefix, seed and truth file; ``Fleet`` makes them look like one.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import Protocol

from bench.procs import BIN
from bench.procs import REPO
from bench.procs import Child
from tests.faults.checker import read_truth

# The drill's faults (tests/faults/test_ingest_drill.py), as shares of the fleet.
FAULTS = {
    "silent-liar": 0.02,
    "exfiltrator": 0.02,
    "lie": 0.01,
    "ignore": 0.01,
    "stubborn": 0.01,
    "slow": 0.01,
    "offline": 0.01,
    "sleep": 0.01,
}


class Measured(Protocol):
    """A process (or several) whose CPU and memory the drill reads: a Child or a Fleet."""

    def cpu_seconds(self) -> float: ...
    def rss_kib(self) -> int: ...


@dataclass
class Fleet:
    """The simulated fleet over several processes: one Python process holding 10,000
    agents fills a core before it offers their upload rate (it offered 121 batches/s of
    333 at 14:41 UTC on 2026-12-03). Each process has its own id prefix, seed and truth."""

    children: list[Child]
    truths: list[Path]

    @classmethod
    def start(cls, args: argparse.Namespace, here: Path, grpc_port: int, ingest: str) -> Fleet:
        parts = args.fleet_processes
        children, truths = [], []
        for k in range(parts):
            agents = args.agents // parts + (1 if k < args.agents % parts else 0)
            truth = here / f"truth-{k}.json"
            argv = simulator(
                grpc_port, agents, f"laptop{k}",
                "--seed", str(k + 1),
                "--insecure", "--connections", str(args.connections),
                "--ingest", ingest, "--upload-every", str(args.upload_every),
                "--report-every", "3600",
                "--truth", str(truth),
                "--fault", ",".join(f"{kind}={share}" for kind, share in FAULTS.items()),
                "--fault-after", "3600", "--slow-max", str(args.slow_max),
            )  # fmt: skip
            children.append(Child(f"fleet {k}", argv, here / f"fleet-{k}.log", REPO))
            truths.append(truth)
        return cls(children, truths)

    def alive(self) -> bool:
        return all(child.alive() for child in self.children)

    def cpu_seconds(self) -> float:
        return sum(child.cpu_seconds() for child in self.children)

    def rss_kib(self) -> int:
        return sum(child.rss_kib() for child in self.children)

    def stop(self, grace: float = 5.0) -> None:
        for child in self.children:
            child.stop(grace=grace)

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(child.log_tail(lines) for child in self.children)

    def strike(self) -> None:
        """Every fault strikes now (SIGUSR1 to each process)."""
        for child in self.children:
            os.kill(child.pid, signal.SIGUSR1)

    def truth(self, *, newer_than: float = 0.0, timeout: float = 10.0) -> dict[str, Any]:
        """The processes' truth files as one: every agent, and when the faults struck
        (None until they struck everywhere)."""
        parts = [read_truth(p, newer_than=newer_than, timeout=timeout) for p in self.truths]
        struck = [part["trigger_at"] for part in parts]
        return {
            "agents": [row for part in parts for row in part["agents"]],
            "trigger_at": max(struck) if all(struck) else None,
        }


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_listening(child: Child, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not listening(port):
        if not child.alive():
            raise RuntimeError(f"{child.name} exited:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{child.name} is not listening on {port} after {timeout:g}s")
        time.sleep(0.05)


def start_server(here: Path, grpc_port: int, http_port: int, lease_ttl: float | None) -> Child:
    """The control server, plaintext, on SQLite in ``here/data``."""
    ttl = ["--lease-ttl", str(lease_ttl)] if lease_ttl else []
    argv = [
        str(BIN / "killswitch"), "serve", "--data-dir", str(here / "data"),
        "--grpc", f"127.0.0.1:{grpc_port}", "--http", f"127.0.0.1:{http_port}", "--insecure",
        "--log-format", "json", "--log-level", "warning", *ttl,
    ]  # fmt: skip
    return Child("server", argv, here / "server.log", REPO)


def start_gateway(
    here: Path, sink_dir: Path, sink_port: int, grpc_port: int, metrics_port: int
) -> Child:
    """The product's side: the real ingest gateway, its sink in ``sink_dir``."""
    argv = [
        str(BIN / "killswitch"), "ingest", "--insecure", "--data-dir", str(sink_dir),
        "--listen", f"127.0.0.1:{sink_port}", "--control", f"127.0.0.1:{grpc_port}",
        "--metrics", f"127.0.0.1:{metrics_port}", "--log-format", "json", "--log-level", "warning",
    ]  # fmt: skip
    return Child("gateway", argv, here / "gateway.log", REPO)


def start_bare_sink(here: Path, sink_dir: Path, sink_port: int) -> Child:
    """The baseline's side: ``bench.bare_sink`` appending every batch to one file."""
    argv = [
        sys.executable, "-m", "bench.bare_sink",
        "--port", str(sink_port), "--out", str(sink_dir / "bare-sink.log"),
    ]  # fmt: skip
    return Child("bare sink", argv, here / "bare-sink.stdout", REPO)


def start_lease_holders(here: Path, grpc_port: int, agents: int, id_prefix: str) -> Child:
    """A small simulator that only holds leases for the agents the harness uploads as.

    Their capture is never uploaded (the harness uploads as them): they tick every 10 s
    instead of 1 s. Through the round 10,000 of them then took about half a core instead
    of 0.8 (runs of 23:40 and 23:50 UTC on 2026-12-04), on both sides alike."""
    argv = simulator(
        grpc_port, agents, id_prefix,
        "--insecure", "--connections", "1", "--upload-every", "3600", "--report-every", "3600",
        "--capture-tick", "10",
    )  # fmt: skip
    return Child(f"{id_prefix} agents", argv, here / f"{id_prefix}-holders.log", REPO)


def simulator(grpc_port: int, agents: int, id_prefix: str, *flags: str) -> list[str]:
    """``killswitch-agent simulate``: ``agents`` agents named ``id_prefix-N``, then ``flags``."""
    return [
        str(BIN / "killswitch-agent"), "simulate", "--server", f"127.0.0.1:{grpc_port}",
        "--agents", str(agents), "--id-prefix", id_prefix, *flags,
    ]  # fmt: skip
