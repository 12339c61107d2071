"""The timed phases of one run, once the fleet is connected: idle cost, pushes, restarts.

Every time is the server's own (ack and verification times) or a wall-clock span
from a moment the harness took just before acting (t0 before CreateHold, the kill
before a restart); polling GetStatus only says when to stop waiting.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.figures import percentile
from bench.harness import Operator
from bench.harness import poll
from bench.harness import wait_answering
from bench.pause_fleet.conditions import VERIFIED
from bench.pause_fleet.conditions import all_connected
from bench.pause_fleet.conditions import all_in
from bench.pause_fleet.conditions import all_stopped
from bench.pause_fleet.conditions import all_verified
from bench.pause_fleet.conditions import others
from bench.pause_fleet.conditions import poll_replicas
from bench.pause_fleet.results import Push
from bench.pause_fleet.results import Reconnect
from bench.pause_fleet.results import Run
from bench.pause_fleet.site import Site
from bench.pause_fleet.systems import Ports
from bench.pause_fleet.systems import System
from bench.procs import REPO
from bench.procs import Child
from bench.procs import free_port
from control.domain.timings import DEFAULT_HEARTBEAT_SECONDS
from control.domain.timings import DEFAULT_LEASE_TTL_SECONDS


@dataclass(frozen=True, slots=True)
class Pace:
    """How the harness waits: poll intervals and bounds on every wait, all in seconds.

    ``verify_poll``: the interval while waiting for VERIFIED_STOPPED (seconds away,
    not milliseconds); ``settle``: quiet time between phases.
    """

    poll_interval: float
    verify_poll: float
    timeout: float
    enrol_timeout: float
    settle: float


# Idle CPU is measured once every stream's chatter is under way (a lease renewal period
# after the fleet connected: renewals start at a random point of the first), over a
# window long enough for a few heartbeats per agent, the same for every system: measured
# 3 s after connecting, over 3 s, the product's figure still held its connect's flushes.
CHATTER_UNDER_WAY_SECONDS = DEFAULT_LEASE_TTL_SECONDS / 3
IDLE_WINDOW_SECONDS = 10.0


def measure_idle(
    result: Run, servers: Sequence[Child], fleet: Child, op: Operator, pace: Pace
) -> None:
    """Memory once the fleet is settled, then idle CPU and what one GetStatus costs."""
    time.sleep(max(pace.settle, CHATTER_UNDER_WAY_SECONDS))
    result.replica_rss_connected_kib = [server.rss_kib() for server in servers]
    result.fleet_rss_kib = fleet.rss_kib()
    result.replica_idle_cpu = _cpu_shares(servers, IDLE_WINDOW_SECONDS)
    latencies = []
    for _ in range(5):
        t = time.perf_counter()
        op.status()
        latencies.append(time.perf_counter() - t)
    result.status_ms = statistics.median(latencies) * 1000


def _cpu_shares(children: Sequence[Child], seconds: float) -> list[float]:
    """Each child's CPU over the next ``seconds``, as a share of one core."""
    cpu, start = [child.cpu_seconds() for child in children], time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    return [
        (child.cpu_seconds() - before) / elapsed
        for child, before in zip(children, cpu, strict=True)
    ]


def measure_answering_idle(
    system: System, workdir: Path, slug: str, *, agents: int, connections: int, pace: Pace
) -> float:
    """Idle CPU of a bare server whose fleet sends the product agent's heartbeats and
    lease requests at the server's default pace, each request answered with a grant: the
    baseline issue 17 compares the product's idle CPU with. A server and fleet of their
    own, started after the timed baseline, so its pushes and memory stay a bare fleet's
    that only acks. Measured once every agent has sent its first lease request."""
    ports = Ports(grpc=free_port(), enroll=0, http=0)
    target = f"127.0.0.1:{ports.grpc}"
    server = Child(
        f"{slug} answering server",
        system.server_argv(ports, workdir, paused_epoch=None),
        workdir / f"{slug}-answering-server.log",
        REPO,
    )
    op, fleet = Operator(target, None), None
    try:
        wait_answering(op, server, pace.timeout)
        chatter = ["--heartbeat-every", str(DEFAULT_HEARTBEAT_SECONDS)]
        chatter += ["--lease-every", str(CHATTER_UNDER_WAY_SECONDS)]
        argv = system.fleet_argv(target, agents, connections, enrolling=None, data_dir=workdir)
        fleet = Child(
            f"{slug} answering fleet",
            [*argv, *chatter],
            workdir / f"{slug}-answering-fleet.log",
            REPO,
        )
        poll_replicas([op], "the answering fleet to connect", all_in("CAPTURING", agents),
                      since=time.time(), timeout=pace.timeout,
                      interval=max(0.5, pace.poll_interval))  # fmt: skip
        time.sleep(CHATTER_UNDER_WAY_SECONDS)
        (share,) = _cpu_shares([server], IDLE_WINDOW_SECONDS)
        return share
    finally:
        op.close()
        if fleet is not None:
            fleet.stop()
        server.stop()


def push(ops: Sequence[Operator], agents: int, pace: Pace, *, verify: bool) -> Push:
    """Pause everyone and time it; resume first if the fleet is paused from the last round.

    ``verify``: then also wait until the server has verified every agent stopped
    (a heartbeat at least one interval after its ack) and time the last one.
    The pause and resume go to replica 0; every replica is polled, each on its own
    thread, until it shows the whole fleet paused (then verified).
    """
    op = ops[0]
    held = op.status().holds
    if held:
        for hold in held:
            op.resume(hold.id)
        poll_replicas(ops, "the fleet to resume", all_in("CAPTURING", agents),
                      since=time.time(), timeout=pace.timeout,
                      interval=pace.poll_interval)  # fmt: skip
        time.sleep(pace.settle)
    t0 = time.time()
    response = op.create_hold()
    rpc = time.time() - t0
    paused = all_stopped(agents)
    polled = poll_replicas(
        ops, "100% STOP_REPORTED", lambda s: s.epoch >= response.epoch and paused(s),
        since=t0, timeout=pace.timeout, interval=pace.poll_interval,
    )  # fmt: skip
    acks = op.acks()
    stale = sum(1 for _, epoch in acks if epoch < response.epoch)
    if len(acks) != agents or stale:
        raise RuntimeError(f"{len(acks)} agents listed, {stale} without an ack of the pause")
    latencies = sorted(at - t0 for at, _ in acks)
    verified = math.nan
    verified_polled = [math.nan]
    if verify:  # seconds, not milliseconds, apart: poll gently
        verified_polled = poll_replicas(
            ops, f"100% {VERIFIED}", all_verified(agents), since=t0, timeout=pace.timeout,
            interval=pace.verify_poll,
        )  # fmt: skip
        times = [r.verified_at.ToNanoseconds() / 1e9 for r in op.agents()]
        if len(times) != agents or min(times) < t0:
            raise RuntimeError(f"{len(times)} agents listed, not all verified since t0")
        verified = max(times) - t0
    return Push(
        rpc=rpc,
        polled=polled[0],
        p50=percentile(latencies, 0.50),
        p99=percentile(latencies, 0.99),
        p100=percentile(latencies, 1.0),
        verified=verified,
        verified_polled=verified_polled[0],
        polled_others=others(polled),
        verified_polled_others=others(verified_polled),
    )


def reconnect(
    site: Site, server: Child, op: Operator, agents: int, pace: Pace
) -> tuple[Child, Reconnect]:
    """kill -9 the paused server, restart it on the same port and data; time the return."""
    epoch = op.status().epoch
    time.sleep(pace.settle)  # let the product flush its last acks before the crash
    t_kill = time.time()
    server.kill9()
    server = site.start_server(epoch)
    wait_answering(op, server, pace.timeout)
    listening = time.time() - t_kill
    every = {"since": t_kill, "timeout": pace.timeout, "interval": pace.poll_interval}
    connected = poll(op, "every agent to reconnect", all_connected(agents), **every)
    settled = poll(op, "100% STOP_REPORTED", all_stopped(agents), **every)
    # Every agent's new ack, from the server's own ack times.
    deadline = time.monotonic() + pace.timeout
    while True:
        acks = [at for at, _ in op.acks()]
        if len(acks) == agents and min(acks) > t_kill:
            break
        if time.monotonic() > deadline:
            raise TimeoutError("timed out waiting for every agent to ack after the restart")
        time.sleep(0.5)
    return server, Reconnect(listening, connected, settled, max(acks) - t_kill)
