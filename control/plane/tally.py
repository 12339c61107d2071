"""The fleet's verdicts, counted as they change rather than recomputed on every read.

An operator polls the fleet's status every second or two during an incident, and at
10,000 agents evaluating every verdict on every poll took 17-40 ms of the event loop
that also serves the agents. A verdict changes only when the agent's facts change (its
``AgentStatus`` revision, its desired state) or when a clock in it runs out (an ack
deadline, a lease, a silent stream: ``Compliance.until``). So each read re-evaluates only
those agents, and the counts by state and the set of unsettled agents move with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from control.domain import Compliance
from control.domain import CompliancePolicy
from control.domain import ComplianceState
from control.domain import Desired
from control.domain import evaluate
from control.domain import is_settled
from control.plane.entries import AgentEntry


@dataclass(slots=True)
class Counted:
    """The facts an agent's counted verdict was evaluated from: if either differs now,
    or the verdict's ``until`` has come, it is evaluated again."""

    revision: int  # the status's (unique to one state of one status object)
    desired: Desired
    until: float  # the verdict's: kept here too, one attribute less to read per agent


class VerdictTally:
    """Every agent's current verdict, the counts by state and the unsettled agents."""

    def __init__(self, agents: Mapping[str, AgentEntry], policy: CompliancePolicy) -> None:
        self._agents = agents
        self._policy = policy
        # agent id -> the verdict in the counts (an entry object may be replaced).
        self._verdicts: dict[str, Compliance] = {}
        self.by_state: dict[ComplianceState, int] = dict.fromkeys(ComplianceState, 0)
        self.unsettled: dict[str, tuple[AgentEntry, Compliance]] = {}

    def refresh(self, now: float) -> None:
        """Bring every count up to ``now``: one look at each agent, an evaluation only
        for those whose facts changed or whose verdict's time ran out."""
        for entry in self._agents.values():
            counted = entry.counted
            if (
                counted is None
                or counted.until <= now
                or counted.revision != entry.status.revision
                or counted.desired is not entry.desired
            ):
                self._recount(entry, now)

    def _recount(self, entry: AgentEntry, now: float) -> None:
        agent_id = entry.agent_id
        verdict = evaluate(entry.desired, entry.status, now=now, policy=self._policy)
        previous = self._verdicts.get(agent_id)
        if previous is not None:
            self.by_state[previous.state] -= 1
        self.by_state[verdict.state] += 1
        self._verdicts[agent_id] = verdict
        if is_settled(entry.desired.mode, verdict.state):
            self.unsettled.pop(agent_id, None)
        else:
            self.unsettled[agent_id] = (entry, verdict)
        entry.counted = Counted(entry.status.revision, entry.desired, verdict.until)
