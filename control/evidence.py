"""Violation evidence: durable, append-only, and the same on every replica.

Whichever replica sees capture after a claimed stop (the one serving the agent on an
ack or heartbeat, any replica on an upload check) appends the evidence to the store
with its audit entry. Until that write succeeds the evidence stays pending and is
retried with every flush: it is never dropped. Every replica merges the evidence it
reads back (at start, on every resync) into its agents: an agent's violation is its
earliest evidence that no operator acknowledgement covers, so a row written by a
replica that never saw the evidence cannot wipe it, and only ``ack-violation``
clears it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence

import structlog

from control.domain import AgentStatus
from control.domain.audit import AuditRecord
from control.store import Store
from control.store import ViolationEvidence

log = structlog.get_logger("killswitch.evidence")

# Who the audit log names for what the server itself observed.
SYSTEM_ACTOR = "control-plane"
# Evidence quotes what an agent sent (channel names): bounded, so that one agent can
# never make the write that carries it fail, and with it every retry.
EVIDENCE_MAX_CHARS = 1000


def _storable(text: str) -> str:
    """PostgreSQL text cannot hold U+0000; an over-long quote is cut, and says so."""
    text = text.replace("\x00", "\ufffd")
    if len(text) > EVIDENCE_MAX_CHARS:
        text = text[: EVIDENCE_MAX_CHARS - 1] + "…"
    return text


class EvidenceLedger:
    """The evidence one replica knows of, per agent, and what it still has to write."""

    def __init__(self, replica_id: str) -> None:
        self._replica_id = replica_id
        # Seen here, not yet written; each with its audit entry.
        self._pending: list[tuple[ViolationEvidence, AuditRecord]] = []
        # Agent id -> evidence id -> evidence, none of it covered by an acknowledgement.
        self._open: dict[str, dict[str, ViolationEvidence]] = {}
        # Agent id -> the newest violation_at an operator acknowledged, on any replica.
        self._acks: dict[str, float] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def record(self, agent_id: str, evidence: str, at: float, *, epoch: int) -> ViolationEvidence:
        """Evidence seen here: kept, and written at the next ``flush``."""
        found = ViolationEvidence(
            f"ev-{secrets.token_hex(8)}", agent_id, at, _storable(evidence), self._replica_id, epoch
        )
        audit = AuditRecord(
            at,
            SYSTEM_ACTOR,
            "system",
            "agent.violation",
            target=agent_id,
            result="violation",
            detail=found.evidence,
        )
        self._pending.append((found, audit))
        self._keep_open([found])
        return found

    async def flush(self, store: Store) -> None:
        """Append what is pending; on failure keep all of it for the next flush."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            await store.record_violations(batch)
        except BaseException:
            self._pending[:0] = batch
            raise
        log.info("violation_evidence_written", count=len(batch))

    def adopt(self, acks: Mapping[str, float], evidence: Sequence[ViolationEvidence]) -> set[str]:
        """Take acknowledgements and evidence read from the store (any replica's);
        return the agents whose violation may have changed."""
        changed = self._keep_open(evidence)
        for agent_id, flagged_at in acks.items():
            if self._acks.get(agent_id, -1.0) >= flagged_at:
                continue
            self._acks[agent_id] = flagged_at
            changed.add(agent_id)
            still_open = {
                k: e for k, e in self._open.get(agent_id, {}).items() if e.flagged_at > flagged_at
            }
            if still_open:
                self._open[agent_id] = still_open
            else:
                self._open.pop(agent_id, None)
        return changed

    def _keep_open(self, evidence: Iterable[ViolationEvidence]) -> set[str]:
        changed = set()
        for found in evidence:
            if found.flagged_at <= self._acks.get(found.agent_id, -1.0):
                continue
            known = self._open.setdefault(found.agent_id, {})
            if found.id not in known:
                known[found.id] = found
                changed.add(found.agent_id)
        return changed

    def apply(self, agent_id: str, status: AgentStatus) -> bool:
        """Make ``status``'s violation the earliest unacknowledged evidence: clear one an
        operator acknowledged, keep or restore any other. Returns whether it changed."""
        before = status.violation, status.violation_at
        acked = self._acks.get(agent_id)
        if status.violation and acked is not None and (status.violation_at or 0.0) <= acked:
            status.acknowledge_violation()
        known = self._open.get(agent_id)
        if known:
            first = min(known.values(), key=lambda e: (e.flagged_at, e.id))
            status.merge_violation(first.evidence, first.flagged_at)
        return (status.violation, status.violation_at) != before
