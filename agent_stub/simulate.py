"""A fleet of simulated agents in one process, sharing K gRPC connections."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
from killswitch.v1 import killswitch_pb2 as pb

from agent_stub.agent import Agent, AgentConfig, Behaviour, open_channel

REGIONS = ("us-east", "us-west", "eu-west", "eu-central", "ap-south")
ORGS = ("eng", "infra", "sales", "research", "support", "finance")
OSES = ("macos", "windows", "linux")
OS_WEIGHTS = (6, 3, 1)


def fleet_configs(
    count: int,
    *,
    seed: int,
    id_prefix: str = "laptop",
    faults: Mapping[Behaviour, int] | None = None,
) -> list[AgentConfig]:
    """Deterministic agents with realistic labels; the same seed gives the same fleet."""
    rng = random.Random(seed)
    configs = [
        AgentConfig(
            agent_id=f"{id_prefix}-{i:05d}",
            labels={
                "region": rng.choice(REGIONS),
                "org": rng.choice(ORGS),
                "os": rng.choices(OSES, OS_WEIGHTS)[0],
                "owner": f"emp-{rng.randrange(100_000):05d}",
            },
        )
        for i in range(count)
    ]
    faulty = rng.sample(range(count), k=min(count, sum((faults or {}).values())))
    for behaviour, n in (faults or {}).items():
        for index in faulty[:n]:
            configs[index].behaviour = behaviour
        faulty = faulty[n:]
    return configs


@dataclass
class Fleet:
    """Runs the agents; ``summary`` is what the simulator prints periodically."""

    target: str
    configs: list[AgentConfig]
    connections: int
    seed: int = 0
    agents: list[Agent] = field(default_factory=list)
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def run(self) -> None:
        k = max(1, min(self.connections, len(self.configs)))
        self._channels = [open_channel(self.target, own_connection=True) for _ in range(k)]
        rng = random.Random(self.seed)
        self.agents = [
            Agent(cfg, self._channels[i % k], rng=random.Random(rng.random()))
            for i, cfg in enumerate(self.configs)
        ]
        try:
            await asyncio.gather(*(agent.run() for agent in self.agents))
        finally:
            await asyncio.gather(*(c.close(grace=None) for c in self._channels))

    def summary(self) -> str:
        modes: Counter[str] = Counter()
        for agent in self.agents:
            if agent.applied_mode == pb.MODE_UNSPECIFIED:
                modes["no directive yet"] += 1
            else:
                modes[pb.Mode.Name(agent.applied_mode).removeprefix("MODE_").lower()] += 1  # type: ignore[arg-type]
        connected = sum(a.connected for a in self.agents)
        capturing = sum(a.engine.capturing for a in self.agents)
        shown = ", ".join(f"{k} {v}" for k, v in sorted(modes.items()))
        return f"{connected}/{len(self.agents)} connected, {capturing} capturing; applied: {shown}"
