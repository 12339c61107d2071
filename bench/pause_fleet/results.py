"""What one run of the pause benchmark measured: pushes, restarts, enrolment, memory, CPU."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field

from bench.pause_fleet.systems import System
from bench.pause_fleet.systems import Topology


@dataclass(frozen=True, slots=True)
class Push:
    """One CreateHold(all): t0 is taken just before the call; acks are server receive times.

    ``verified``: the last agent's server verification time - t0 (NaN: not measured).
    With several replicas, the pause goes to replica 0 and ``polled``, the acks and
    ``verified`` are replica 0's view, which includes the agents of the other replicas.
    """

    rpc: float
    polled: float
    p50: float
    p99: float
    p100: float
    verified: float = math.nan
    # Seconds from t0 until polling GetStatus showed 100% VERIFIED_STOPPED on replica 0,
    # and until the last of the other replicas showed 100% paused / verified.
    verified_polled: float = math.nan
    polled_others: float = math.nan
    verified_polled_others: float = math.nan


@dataclass(frozen=True, slots=True)
class Reconnect:
    """kill -9, restart at once; every figure counts from the kill."""

    listening: float
    connected: float
    settled: float
    reacked: float


@dataclass(frozen=True, slots=True)
class Enrolment:
    """An mTLS fleet's enrolment, before anything else is measured.

    ``wall``: simulator start to the last agent certificate the server issued;
    ``span``: the server's first to last agent certificate; ``rss_kib``: the
    server's RSS once the simulator said every agent was enrolled.
    """

    agents: int
    wall: float
    span: float
    rss_kib: int

    @property
    def rate(self) -> float:
        """Agents enrolled per second, first to last certificate."""
        return (self.agents - 1) / self.span if self.span > 0 else math.nan


@dataclass(slots=True)
class Run:
    """One system's run; server figures are summed over the replicas, also kept apiece."""

    system: System
    topology: Topology
    agents: int
    repeat: int
    command: str = ""
    connect: float = 0.0
    fleet_rss_kib: int = 0
    status_ms: float = 0.0
    enrolment: Enrolment | None = None
    # Seconds the bare TLS baseline's certificates took to make, before its server started.
    certificates_made: float | None = None
    pushes: list[Push] = field(default_factory=list)
    reconnects: list[Reconnect] = field(default_factory=list)
    replica_rss_fresh_kib: list[int] = field(default_factory=list)
    replica_rss_connected_kib: list[int] = field(default_factory=list)
    replica_idle_cpu: list[float] = field(default_factory=list)
    # A bare server's idle CPU answering the product agents' heartbeats and lease
    # requests (baseline only; the product's own idle CPU already answers them).
    answering_idle_cpu: float | None = None
    # Agent streams each replica serves, from its /metrics (product only).
    replica_streams: list[int] = field(default_factory=list)

    @property
    def replicas(self) -> int:
        return len(self.replica_rss_fresh_kib)

    @property
    def rss_fresh_kib(self) -> int:
        return sum(self.replica_rss_fresh_kib)

    @property
    def rss_connected_kib(self) -> int:
        return sum(self.replica_rss_connected_kib)

    @property
    def idle_cpu(self) -> float:
        return sum(self.replica_idle_cpu)

    def idle_cpu_answering(self) -> list[float]:
        """Idle CPU with the product agents' idle messages answered (empty: unmeasured)."""
        if self.system.product:
            return [self.idle_cpu]
        return [] if self.answering_idle_cpu is None else [self.answering_idle_cpu]

    def kib_per_agent(self) -> float:
        return (self.rss_connected_kib - self.rss_fresh_kib) / self.agents

    def samples(self, name: str) -> list[float]:
        """One field of every ``Push`` or every ``Reconnect`` (empty: not measured)."""
        rounds: Sequence[Push | Reconnect] = (
            self.pushes if name in Push.__dataclass_fields__ else self.reconnects
        )
        values = [float(getattr(r, name)) for r in rounds]
        return [v for v in values if not math.isnan(v)]
