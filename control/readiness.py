"""Readiness, read from the plane: the facts ``control.domain.readiness`` judges.

One source for the RPC (``killswitch readiness``), the dashboard panel and the
``killswitch_readiness_agents`` metric, so all three give the same answer. What an
agent says of itself in Hello (version, lease clock, skew) lives in this replica's
memory: after a restart, or for a laptop served by another replica, those classes
are judged once it connects here again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping

from control.domain.identity import CertificateRecord
from control.domain.identity import Role
from control.domain.labels import label_mismatch
from control.domain.readiness import AgentFacts
from control.domain.readiness import ReadinessPolicy
from control.domain.readiness import ReadinessReport
from control.domain.readiness import assess
from control.governance import Governance
from control.plane import ControlPlane

# Agents whose facts are gathered between two turns of the event loop.
FACTS_PER_TURN = 1_000


def newest_agent_certificates(certificates: Iterable[CertificateRecord]) -> dict[str, float]:
    """Agent id -> expiry of its newest unrevoked agent certificate (what it connects with)."""
    newest: dict[str, float] = {}
    for cert in certificates:
        if cert.role is Role.AGENT and not cert.revoked:
            newest[cert.subject] = max(cert.not_after, newest.get(cert.subject, 0.0))
    return newest


async def fleet_facts(plane: ControlPlane, certificates: Mapping[str, float]) -> list[AgentFacts]:
    """Every agent's facts, ``FACTS_PER_TURN`` at a time: at 19,000 agents the whole
    fleet in one go held the event loop for half a second, every stream with it."""
    facts = []
    for n, (agent_id, labels, status) in enumerate(plane.agent_records()):
        if n and n % FACTS_PER_TURN == 0:
            await asyncio.sleep(0)
        facts.append(
            AgentFacts(
                agent_id,
                last_seen=status.last_seen,
                connected=status.connected,
                hello=status.hello,
                disputed_labels=label_mismatch(labels, status.reported_labels),
                certificate_not_after=certificates.get(agent_id),
                lease_expires_at=status.lease_expires_at,
            )
        )
    return facts


class Readiness:
    """Assesses the fleet on demand against the server's readiness policy."""

    def __init__(
        self,
        plane: ControlPlane,
        governance: Governance,
        policy: ReadinessPolicy,
        clock: Callable[[], float],
    ) -> None:
        self._plane = plane
        self._governance = governance
        self.policy = policy
        self._clock = clock

    async def assess(self) -> ReadinessReport:
        certificates = newest_agent_certificates(await self._governance.certificates())
        return assess(await fleet_facts(self._plane, certificates), self.policy, self._clock())
