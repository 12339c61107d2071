"""The server's state before the fuzzing, and the checks that nothing moved since."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field

import grpc
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from tests.conftest import ServerProcess
from tests.conftest import wait_for
from tests.malformed.calls import CALL_TIMEOUT
from tests.malformed.calls import GOOD
from tests.malformed.calls import IC
from tests.malformed.calls import StreamingAgent
from tests.malformed.calls import readyz


@dataclass(frozen=True)
class Snapshot:
    epoch: int
    holds: tuple[bytes, ...]
    status_epoch: int
    total: int
    agents: frozenset[str]
    audit_head: int


@dataclass
class Fleet:
    server: ServerProcess
    channels: dict[str, grpc.Channel]
    incident_hold: str  # has an open resume request (REQUEST)
    spare_hold: str  # has none: a valid RequestResume on it would open one
    opt_out_hold: str  # employee-1's opt-out of LAPTOP
    request_id: str
    good: StreamingAgent
    baseline: Snapshot = field(init=False)
    calls: int = 0

    @property
    def operator(self) -> pb_grpc.OperatorStub:
        return pb_grpc.OperatorStub(self.channels[IC])

    def snapshot(self) -> Snapshot:
        holds = self.operator.ListHolds(pb.ListHoldsRequest(), timeout=CALL_TIMEOUT)
        status = self.operator.GetStatus(pb.GetStatusRequest(), timeout=CALL_TIMEOUT)
        agents = self.operator.ListAgents(pb.ListAgentsRequest(), timeout=CALL_TIMEOUT)
        audit = self.operator.ListAudit(pb.ListAuditRequest(limit=1), timeout=CALL_TIMEOUT)
        return Snapshot(
            epoch=holds.epoch,
            holds=tuple(h.SerializeToString(deterministic=True) for h in holds.holds),
            status_epoch=status.epoch,
            total=status.total,
            agents=frozenset(a.agent_id for a in agents),
            audit_head=audit.head_seq,
        )

    def audit_since(self, seq: int) -> list[pb.AuditEntry]:
        entries: list[pb.AuditEntry] = []
        while True:
            page = self.operator.ListAudit(pb.ListAuditRequest(after_seq=seq), timeout=30)
            entries.extend(page.entries)
            if not page.entries:
                return entries
            seq = page.entries[-1].seq

    def agent(self, agent_id: str) -> pb.AgentRecord:
        (record,) = [
            a
            for a in self.operator.ListAgents(pb.ListAgentsRequest(), timeout=CALL_TIMEOUT)
            if a.agent_id == agent_id
        ]
        return record

    def tick(self) -> None:
        """Called once per example: every so often, check the server still serves."""
        self.calls += 1
        if self.calls % 40 == 0:
            self.assert_serving(thorough=False)

    def assert_serving(self, *, thorough: bool = True) -> None:
        assert readyz(self.server) == 200
        assert self.good.alive, f"the well-behaved agent lost its stream: {self.good.describe()}"
        if thorough:  # heartbeats every 0.3 s; a busy machine may delay one a little
            wait_for(
                lambda: (r := self.agent(GOOD)).connected and r.state == "CAPTURING",
                5,
                "the well-behaved agent to be connected and capturing",
            )

    def assert_state_unchanged(self) -> None:
        now = self.snapshot()
        base = self.baseline
        assert now.holds == base.holds, "a refused request created or lifted a hold"
        assert (now.epoch, now.status_epoch) == (base.epoch, base.status_epoch), "epoch moved"
        assert now.total == base.total and now.agents == base.agents, (
            f"the fleet changed: {sorted(now.agents ^ base.agents)}"
        )
        accepted = [
            (e.seq, e.actor, e.action, e.target)
            for e in self.audit_since(base.audit_head)
            # The tests' own fresh identities (fresh_channel), issued offline with the root.
            if e.result == "ok" and e.action != "certs.issue"
        ]
        assert not accepted, f"requests meant to be refused were carried out: {accepted}"
        log = self.server.log_path.read_text(errors="replace")
        assert "agent_flush_failed" not in log, "agent state no longer reaches the database"
        self.assert_serving()
