"""A fleet of simulated agents in one process.

Over mTLS every agent has its own connection (a certificate names one agent);
insecure, they share K connections and say who they are in call metadata.

Faulty agents behave honestly until the fault trigger; the ground truth of what
every agent captured can be written to a JSON file for the drills to check.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import grpc
import structlog
from killswitch.v1 import killswitch_pb2 as pb

from agent_stub.channels import Reopen
from agent_stub.channels import ReplicaRotation
from agent_stub.channels import open_channel
from agent_stub.clock import PLATFORM_CLOCK
from agent_stub.clock import Clock
from agent_stub.clock import NoSleepClock
from agent_stub.config import Tuning
from agent_stub.identity import AgentIdentity
from agent_stub.identity import Metadata
from agent_stub.identity import insecure_metadata
from agent_stub.local_state import NoticeBoard
from agent_stub.notices import Notifier
from agent_stub.periodic import SharedRounds
from gc_policy import run_gc_policy
from simulator.faults import Fault
from simulator.faults import FaultTuning
from simulator.faults import SimulatedConfig
from simulator.faulty import SimulatedAgent

log = structlog.get_logger("killswitch.agent.simulate")

REGIONS = ("us-east", "us-west", "eu-west", "eu-central", "ap-south")
ORGS = ("eng", "infra", "sales", "research", "support", "finance")
OSES = ("macos", "windows", "linux")
OS_WEIGHTS = (6, 3, 1)
TRUTH_EVERY_SECONDS = 1.0
# An agent's channel, call metadata, how to reopen the channel (if it owns it), and its
# channel to the ingest gateway (if it uploads to one).
Transport = tuple[
    SimulatedConfig, grpc.aio.Channel, Metadata, Reopen | None, grpc.aio.Channel | None
]


def fault_counts(fractions: Mapping[Fault, float], agents: int) -> dict[Fault, int]:
    """Whole agents per fault (fractions of ``agents``, summing to at most 1).

    Largest remainders, so rounding never gives more faulty agents than the
    fractions add up to.
    """
    exact = {fault: fraction * agents for fault, fraction in fractions.items()}
    counts = {fault: math.floor(share) for fault, share in exact.items()}
    missing = math.floor(sum(exact.values()) + 0.5) - sum(counts.values())
    order = list(Fault)
    by_remainder = sorted(exact, key=lambda f: (counts[f] - exact[f], order.index(f)))
    for fault in by_remainder[:missing]:
        counts[fault] += 1
    return counts


CANARY_EVERY = 20


def fleet_configs(
    count: int,
    *,
    seed: int,
    id_prefix: str = "laptop",
    faults: Mapping[Fault, int] | None = None,
    tuning: Tuning | None = None,
    fault_tuning: FaultTuning | None = None,
) -> list[SimulatedConfig]:
    """Deterministic agents with realistic labels; the same seed gives the same fleet."""
    rng = random.Random(seed)
    shared = tuning or Tuning()
    faults_last = fault_tuning or FaultTuning()
    configs = [
        SimulatedConfig(
            agent_id=f"{id_prefix}-{i:05d}",
            labels={
                "region": rng.choice(REGIONS),
                "org": rng.choice(ORGS),
                "os": rng.choices(OSES, OS_WEIGHTS)[0],
                # Every 20th laptop is in the canary ring that drills pause first.
                "ring": "canary" if i % CANARY_EVERY == 0 else "general",
                # The first laptop belongs to `employee-1`, the identity `killswitch init`
                # creates, so the demo's employee has a laptop to look at.
                "owner": "employee-1" if i == 0 else f"employee-{rng.randrange(2, 100_000)}",
            },
            tuning=shared,
            fault_tuning=faults_last,
        )
        for i in range(count)
    ]
    wanted = sorted((faults or {}).items(), key=lambda item: list(Fault).index(item[0]))
    faulty = rng.sample(range(count), k=min(count, sum(n for _, n in wanted)))
    for fault, n in wanted:
        for index in faulty[:n]:
            configs[index].fault = fault
        faulty = faulty[n:]
    return configs


def write_json_atomically(path: Path, data: object) -> None:
    """Readers never see half a file: write beside it, then rename over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


@dataclass
class Fleet:
    """Runs the agents; ``summary`` is what the simulator prints periodically.

    With ``identities`` (agent id -> its certificate) each agent connects over
    mTLS on its own channel; without, over ``connections`` shared plaintext ones.
    With ``ingest_target`` the agents upload their batches to that gateway the same way
    (own certificate, or shared plaintext connections with the claimed identity).
    With ``notifier`` every agent shows its notices there.
    """

    target: str
    configs: list[SimulatedConfig]
    connections: int
    identities: Mapping[str, AgentIdentity] | None = None
    seed: int = 0
    # Seconds after start when faulty agents start misbehaving (SIGUSR1: at once).
    fault_after: float = 15.0
    truth_path: Path | None = None
    ingest_target: str | None = None
    # Agents that claim no sleep-counting clock: they refuse to capture, as on such a platform.
    no_sleep_clock: bool = False
    # Every agent's notices go to this one notifier (a file: one line per notice).
    notifier: Notifier | None = None
    agents: list[SimulatedAgent] = field(default_factory=list)
    trigger_at: float | None = None
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    def _clock(self) -> Clock | NoSleepClock:
        if self.no_sleep_clock:
            return NoSleepClock("simulated: no clock that counts sleep")
        return PLATFORM_CLOCK

    async def run(self) -> None:
        rng = random.Random(self.seed)
        # One timer per capture period for the whole fleet's capture ticks.
        capture_rounds = {
            tick: SharedRounds(tick) for tick in {cfg.tuning.capture_tick for cfg in self.configs}
        }
        self.agents = [
            SimulatedAgent(
                cfg,
                channel,
                call_metadata=metadata,
                rng=random.Random(rng.random()),
                reopen=reopen,
                ingest=ingest,
                clock=self._clock(),
                notices=None
                if self.notifier is None
                else NoticeBoard(cfg.agent_id, self.notifier, None),
                capture_rounds=capture_rounds[cfg.tuning.capture_tick],
            )
            for cfg, channel, metadata, reopen, ingest in self._transports()
        ]
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, self.trigger_faults)
        trigger = loop.call_later(self.fault_after, self.trigger_faults)
        tasks = [asyncio.create_task(self._run_agent(agent)) for agent in self.agents]
        # 10,000 agents are millions of long-lived objects: the server's remedy halves
        # the simulator's CPU too (full collections otherwise take a third of it).
        tasks.append(asyncio.create_task(run_gc_policy()))
        if self.truth_path is not None:
            tasks.append(asyncio.create_task(self._keep_writing_truth(self.truth_path)))
        try:
            await asyncio.gather(*tasks)
        finally:
            trigger.cancel()
            loop.remove_signal_handler(signal.SIGUSR1)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for rounds in capture_rounds.values():
                rounds.close()
            if self.truth_path is not None:
                write_json_atomically(self.truth_path, self.truth())
            await asyncio.gather(*(c.close(grace=None) for c in self._channels))

    @staticmethod
    async def _run_agent(agent: SimulatedAgent) -> None:
        """One agent until the fleet stops. An agent ending otherwise is a simulator bug:
        logged, and the rest of the fleet runs on (one agent's CancelledError in the
        fleet's gather once stopped all 10,000 without a word)."""
        try:
            await agent.run()
            ended = "returned"
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the fleet is stopping
            ended = "CancelledError from inside"
        except Exception as exc:
            ended = repr(exc)
        log.error("simulated_agent_ended", agent_id=agent.agent_id, error=ended)

    def _transports(self) -> list[Transport]:
        """Each agent's channels, call metadata and how to reopen the control channel
        (the first channels are kept for closing). Agents with a connection of their own
        (mTLS, as laptops) reopen it to move off a replica that cannot serve them; shared
        ones cannot."""
        ingest = self.ingest_target
        if self.identities is not None:
            transports: list[Transport] = []
            for cfg in self.configs:
                credentials = self.identities[cfg.agent_id].credentials()
                reopen = ReplicaRotation(self.target, credentials=credentials)
                uploads = None if ingest is None else open_channel(ingest, credentials=credentials)
                transports.append((cfg, reopen(), (), reopen, uploads))
            self._channels = [channel for _, channel, _, _, _ in transports]
            self._channels += [up for *_, up in transports if up is not None]
            return transports
        k = max(1, min(self.connections, len(self.configs)))
        self._channels = [open_channel(self.target) for _ in range(k)]
        shared = [] if ingest is None else [open_channel(ingest) for _ in range(k)]
        self._channels += shared
        return [
            (
                cfg,
                self._channels[i % k],
                insecure_metadata(cfg.agent_id),
                None,
                shared[i % k] if shared else None,
            )
            for i, cfg in enumerate(self.configs)
        ]

    def trigger_faults(self) -> None:
        """Faulty agents start misbehaving (once; later calls do nothing)."""
        if self.trigger_at is not None:
            return
        self.trigger_at = time.time()
        for agent in self.agents:
            agent.trigger_fault()

    async def _keep_writing_truth(self, path: Path) -> None:
        while True:
            write_json_atomically(path, self.truth())
            await asyncio.sleep(TRUTH_EVERY_SECONDS)

    def truth(self) -> dict[str, Any]:
        """What every agent really captured, for the ``--truth`` file."""
        return {
            "trigger_at": self.trigger_at,
            "agents": [
                agent.truth.row(agent.agent_id, agent.config.fault.value, agent.lease.clock())
                for agent in self.agents
            ],
        }

    def summary(self) -> str:
        modes: Counter[str] = Counter()
        for agent in self.agents:
            if agent.applied_mode == pb.MODE_UNSPECIFIED:
                modes["no directive yet"] += 1
            else:
                modes[pb.Mode.Name(agent.applied_mode).removeprefix("MODE_").lower()] += 1
        connected = sum(a.connected for a in self.agents)
        capturing = sum(a.truth.capturing(a.lease.clock()) for a in self.agents)
        shown = ", ".join(f"{k} {v}" for k, v in sorted(modes.items()))
        faults = "; faults triggered" if self.trigger_at is not None else ""
        return (
            f"{connected}/{len(self.agents)} connected, {capturing} capturing;"
            f" applied: {shown}{faults}"
        )
