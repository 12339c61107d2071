"""The batched writer: what changed about agents reaches the store a few times a second.

Agent messages only mark an agent dirty (a set insertion on the hot path); the flush
loop writes every dirty agent's row, the audit entries about them and the labels
operators decided, in one transaction, and violation evidence before them. A failed
flush keeps all of it for the next one. A change an ack follows within moments (a new
desired state, the directive that tells it) waits for that ack's row, a little while
at most (``ACK_ROW_WAIT_SECONDS``).
"""

from __future__ import annotations

import asyncio

import structlog

from control.domain.audit import AuditRecord
from control.errors import StoreError
from control.evidence import EvidenceLedger
from control.lifecycle import cancel_and_wait
from control.plane.context import PlaneContext
from control.plane.context import PlanePart
from control.plane.entries import AgentEntry
from control.store import DecidedLabels
from control.store import StoredAgent

log = structlog.get_logger("killswitch.plane")

# How long a stopping replica waits to write what it holds (a healthy store writes a
# 10,000-agent flush in well under a second; one that is away would take the pool's
# 10 s connection timeout, or for ever).
STOP_FLUSH_SECONDS = 3.0
# How long a new desired state, and the directive that tells it, wait for the agent's
# ack before the row is written without it. The ack's row, nearly always sooner, carries
# them: a fleet-wide pause writes one row per agent for the change and its ack, not two.
# Nothing is lost by waiting: the desired state follows from the committed holds, which
# every replica and every restart reconciles again, and what a stream was sent starts
# again at each connect. Other replicas, which time the ack deadline (30 s) from the
# send, see it this much later at most.
ACK_ROW_WAIT_SECONDS = 2.0


class AgentWriter(PlanePart):
    def __init__(
        self, context: PlaneContext, agents: dict[str, AgentEntry], *, flush_interval: float
    ) -> None:
        super().__init__(context)
        self._agents = agents
        self._replica_id = context.replica_id
        self._flush_interval = flush_interval
        # Agents whose row must be written at the next flush. The other parts keep a
        # reference and add to it on every message: it is emptied, never replaced.
        self.dirty: set[str] = set()
        # Changed figures only (see ``AgentReports.observe_upload``): written with the
        # agent's next row, or at the liveness cadence, and at stop. Never replaced.
        self.figures_unsaved: set[str] = set()
        # Agents whose row waits for their ack, since when, oldest first
        # (``ACK_ROW_WAIT_SECONDS``); ``awaits_ack`` adds them.
        self.awaiting_ack: dict[str, float] = {}
        # Audit entries about agent rows (violations, relabels) and the labels operators
        # decided ride in the next flush's transaction.
        self.pending_audit: list[AuditRecord] = []
        self.pending_labels: list[DecidedLabels] = []
        # Violation evidence and acknowledgements, from every replica.
        self.evidence = EvidenceLedger(context.replica_id)
        self._flusher: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_loop(), name="agent-flush")

    async def stop(self) -> None:
        """End the flush loop and write what is left, for a bounded time."""
        await cancel_and_wait(self._flusher)
        self._flusher = None
        self.dirty |= self.figures_unsaved
        self.dirty |= self.awaiting_ack.keys()
        try:
            async with asyncio.timeout(STOP_FLUSH_SECONDS):
                await self.flush()
        except (TimeoutError, StoreError) as exc:
            # The store is away: waiting longer keeps a replica an operator is
            # restarting mid-outage hanging, and writes nothing more. What is lost is
            # named here, the one record left of it.
            log.error(
                "final_flush_failed",
                error=str(exc) or f"no answer from the store within {STOP_FLUSH_SECONDS} s",
                agents_unsaved=sorted(self.dirty)[:50],
                agents_unsaved_count=len(self.dirty),
                audit_entries_unsaved=len(self.pending_audit),
                violation_evidence_unsaved=self.evidence.pending,
            )

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            try:
                await self.flush()
            except Exception:
                # Kept for the next flush; whether the database is lost is the probe's call.
                log.exception("agent_flush_failed", pending=len(self.dirty))

    def awaits_ack(self, agent_id: str, at: float) -> None:
        """The agent's desired state changed, or a directive went out: its row waits a
        little for the ack (``ACK_ROW_WAIT_SECONDS``)."""
        if agent_id not in self.awaiting_ack:  # the oldest change sets the wait
            self.awaiting_ack[agent_id] = at

    def _waits_over(self, now: float) -> None:
        waiting = self.awaiting_ack
        while waiting:
            agent_id, since = next(iter(waiting.items()))
            # A wait that began "after now" is over: a clock stepped back must not hold up
            # every row queued behind it for as long as the step.
            if 0 <= now - since < ACK_ROW_WAIT_SECONDS:
                return
            del waiting[agent_id]
            self.dirty.add(agent_id)

    async def flush(self) -> None:
        """Write pending violation evidence, then changed agents and pending audit in one
        transaction; on failure keep all of it."""
        await self.evidence.flush(self._context.store)
        self._waits_over(self._clock())
        if not self.dirty and not self.pending_audit and not self.pending_labels:
            return
        batch = self.dirty.copy()
        self.dirty.clear()
        self.figures_unsaved -= batch
        for agent_id in batch:
            self.awaiting_ack.pop(agent_id, None)
        audit, self.pending_audit = self.pending_audit, []
        labels, self.pending_labels = self.pending_labels, []
        rows = []
        now = self._clock()
        for agent_id in batch:
            entry = self._agents[agent_id]
            if entry.remote is not None:
                continue  # the replica serving it writes it
            entry.last_seen_saved = entry.status.last_seen or 0.0
            entry.row_saved_at = now
            entry.silent_saved = now - entry.last_seen_saved > self._policy.silence_timeout
            # A copy: the store may read it on another thread while the loop moves on.
            # Shallow is enough: record_* replace `channels`, never mutate it.
            lease = entry.status.lease_expires_at
            status = entry.status.copied(
                lease_expires_at=None if lease is None else max(lease, entry.lease_bound_saved),
            )
            rows.append(
                StoredAgent(agent_id, entry.labels, entry.desired, status, self._replica_id, now)
            )
        try:
            await self._context.store.save_agents(rows, audit, labels)
        except BaseException:
            self.dirty |= batch
            self.pending_audit[:0] = audit
            self.pending_labels[:0] = labels
            raise
