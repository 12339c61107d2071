"""The ``Store`` contract, once, for every database: each call runs one transaction
script (``control.store.scripts``) in a transaction the database opens.

A database's store subclasses ``ScriptedStore`` and says only how it opens a
transaction (``_transaction``) and a read (``_read``), plus what has no script because
only it does it (beats, watching, the lead, agent rows of other replicas).
"""

from __future__ import annotations

from abc import ABC
from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar
from typing import TypeVar

from control.domain import Hold
from control.domain import HoldDraft
from control.domain.approvals import ResumeRequest
from control.domain.audit import AuditEntry
from control.domain.audit import AuditRecord
from control.domain.audit import ChainHead
from control.domain.identity import CertificateRecord
from control.domain.identity import EnrollToken
from control.domain.rollout import Run
from control.errors import InvalidInput
from control.store import ArchivedCounts
from control.store import DashboardSession
from control.store import DecidedLabels
from control.store import LoadedState
from control.store import OutboxFeed
from control.store import RunChange
from control.store import RunCommit
from control.store import SharedState
from control.store import StoredAgent
from control.store import ViolationEvidence
from control.store import codec
from control.store import scripts
from control.store import write_checks
from control.store.codec import Row
from control.store.outbox import ClaimedMessage
from control.store.outbox import OutboxMessage
from control.store.scripts import Script
from control.store.transaction import Params
from control.store.transaction import Statements
from control.store.transaction import Transaction

T = TypeVar("T")


class ScriptedStore(ABC):
    """The calls of the ``Store`` contract that are transaction scripts."""

    # Set by the server when webhooks are configured (``control.webhooks``).
    outbox_feed: OutboxFeed | None = None
    # This database's statements, for the reads of one statement.
    _sql: ClassVar[Statements]

    @abstractmethod
    async def _transaction(self, script: Script[T], *, may_spend_reserve: bool = False) -> T:
        """Run ``script`` in a write transaction and commit it. ``may_spend_reserve``: a
        pause, which must commit on a full disk too (``control.store.reserve``)."""

    @abstractmethod
    async def _read(self, script: Script[T], *, snapshot: bool = False) -> T:
        """Run ``script``, which only reads; ``snapshot``: in one consistent snapshot."""

    async def _write(
        self,
        records: Sequence[AuditRecord],
        change: Script[T],
        *,
        may_spend_reserve: bool = False,
    ) -> T:
        """Apply ``change`` and append its audit entries in one transaction, then log them.

        The log line carries each entry's hash off the database: an anchor that a
        consistently cut log and head cannot match.
        """

        async def script(tx: Transaction) -> tuple[T, list[AuditEntry]]:
            return await scripts.commit(tx, records, change, self.outbox_feed)

        result, entries = await self._transaction(script, may_spend_reserve=may_spend_reserve)
        write_checks.log_appended(entries)
        return result

    async def _read_one(self, query: str, params: Params) -> Row | None:
        async def read(tx: Transaction) -> Row | None:
            return await tx.one(query, params)

        return await self._read(read)

    async def _read_all(self, query: str, params: Params = ()) -> list[Row]:
        async def read(tx: Transaction) -> list[Row]:
            return await tx.all(query, params)

        return await self._read(read)

    # ------------------------------------------------------------ holds, requests, runs

    async def create_hold(self, draft: HoldDraft, audit: AuditRecord) -> Hold:
        return await self._write(
            [audit], lambda tx: scripts.create_hold(tx, draft), may_spend_reserve=True
        )

    async def reactivate_hold(self, draft: HoldDraft, audit: AuditRecord) -> Hold:
        return await self._write(
            [audit], lambda tx: scripts.reactivate_hold(tx, draft), may_spend_reserve=True
        )

    async def lift_hold(
        self, hold_id: str, lifted_by: str, lifted_at: float, audit: AuditRecord
    ) -> Hold:
        return await self._write(
            [audit], lambda tx: scripts.lift_hold(tx, hold_id, lifted_by, lifted_at)
        )

    async def save_resume_request(self, request: ResumeRequest, audit: AuditRecord) -> None:
        """Refused with ``Conflict`` unless it is a new request, an edit of an open one, or
        a decision on a pending one: see ``write_checks.check_request_write``."""
        await self._write([audit], lambda tx: scripts.save_resume_request(tx, request))

    async def execute_resume(
        self, request: ResumeRequest, lifted_at: float, audit: AuditRecord
    ) -> Hold:
        """The lift is attributed to the audit record's actor: whoever executes the resume."""
        return await self._write(
            [audit], lambda tx: scripts.execute_resume(tx, request, audit.actor, lifted_at)
        )

    async def commit_run(self, change: RunChange, audit: Sequence[AuditRecord]) -> RunCommit:
        return await self._write(audit, lambda tx: scripts.commit_run(tx, change))

    async def archive_history(self, before: float, now: float, limit: int) -> ArchivedCounts:
        return await self._write((), lambda tx: scripts.archive_history(tx, before, now, limit))

    async def archived_hold(self, hold_id: str) -> Hold | None:
        row = await self._read_one(self._sql.archived_hold, {"id": hold_id})
        return None if row is None else codec.hold_from_row(row)

    async def archived_request(self, request_id: str) -> ResumeRequest | None:
        row = await self._read_one(self._sql.archived_request, {"id": request_id})
        return None if row is None else codec.resume_from_row(row)

    async def archived_run(self, run_id: str) -> Run | None:
        row = await self._read_one(self._sql.archived_run, {"id": run_id})
        return None if row is None else codec.run_from_json(row["run"])

    # ------------------------------------------------------------ agents and violations

    async def save_agents(
        self,
        agents: Sequence[StoredAgent],
        audit: Sequence[AuditRecord] = (),
        labels: Sequence[DecidedLabels] = (),
    ) -> None:
        # Encoded before the transaction opens: the hot path of a large fleet.
        rows = [codec.agent_to_row(agent) for agent in agents]
        if rows or audit or labels:
            await self._write(audit, lambda tx: scripts.save_agents(tx, rows, labels))

    async def labels_decided_since(self, version: int) -> list[DecidedLabels]:
        rows = await self._read_all(self._sql.labels_decided_since, (version,))
        return [codec.decided_labels_from_row(r) for r in rows]

    async def load_agent(self, agent_id: str) -> StoredAgent | None:
        row = await self._read_one(self._sql.agent, (agent_id,))
        return None if row is None else codec.agent_from_row(row)

    async def acknowledge_violation(
        self, agent_id: str, violation_at: float, audit: AuditRecord
    ) -> None:
        await self._write(
            [audit], lambda tx: scripts.acknowledge_violation(tx, agent_id, violation_at)
        )

    async def record_violations(
        self, found: Sequence[tuple[ViolationEvidence, AuditRecord]]
    ) -> None:
        # Filled by the script, before _write appends it: only new evidence is audited.
        audit: list[AuditRecord] = []
        if found:
            await self._write(audit, lambda tx: scripts.record_violations(tx, found, audit))

    # ------------------------------------------------------------ shared state and audit

    async def load(self) -> LoadedState:
        return await self._read(scripts.load, snapshot=True)

    async def load_shared(self) -> SharedState:
        return await self._read(scripts.read_shared, snapshot=True)

    async def append_audit(self, records: Sequence[AuditRecord]) -> None:
        if records:
            await self._write(records, _nothing)

    async def read_audit(self, after_seq: int, limit: int) -> tuple[list[AuditEntry], ChainHead]:
        if limit < 1:
            raise InvalidInput(f"limit must be at least 1, got {limit}")
        return await self._read(lambda tx: scripts.read_audit(tx, after_seq, limit), snapshot=True)

    # ------------------------------------------------------------ identities

    async def create_enroll_token(self, token: EnrollToken, audit: AuditRecord) -> None:
        await self._write([audit], lambda tx: scripts.create_enroll_token(tx, token))

    async def enrol_agent(
        self, token_id: str, secret: str, certificate: CertificateRecord, audit: AuditRecord
    ) -> EnrollToken:
        return await self._write(
            [audit], lambda tx: scripts.enrol_agent(tx, token_id, secret, certificate)
        )

    async def record_certificate(
        self, certificate: CertificateRecord, audit: AuditRecord | None
    ) -> None:
        await self._write(
            [] if audit is None else [audit],
            lambda tx: scripts.record_certificate(tx, certificate),
        )

    async def revoke_certificates(
        self, subject_or_serial: str, revoked_at: float, audit: AuditRecord
    ) -> list[CertificateRecord]:
        return await self._write(
            [audit], lambda tx: scripts.revoke_certificates(tx, subject_or_serial, revoked_at)
        )

    async def list_certificates(self) -> list[CertificateRecord]:
        return [codec.certificate_from_row(r) for r in await self._read_all(self._sql.certificates)]

    # ------------------------------------------------------------ webhooks

    async def enqueue_webhooks(self, messages: Sequence[OutboxMessage]) -> None:
        await self._write((), lambda tx: scripts.enqueue_webhooks(tx, messages))

    async def claim_webhooks(self, now: float, until: float, limit: int) -> list[ClaimedMessage]:
        return await self._write((), lambda tx: scripts.claim_webhooks(tx, now, until, limit))

    async def webhook_delivered(self, message_id: int, now: float) -> None:
        params = {"id": message_id, "now": now}
        await self._write((), lambda tx: tx.execute(tx.sql.webhook_delivered, params))

    async def webhook_retry(self, message_id: int, next_at: float, error: str) -> None:
        params = {"id": message_id, "next_at": next_at, "error": error}
        await self._write((), lambda tx: tx.execute(tx.sql.webhook_retry, params))

    async def prune_webhooks(self, delivered_before: float) -> int:
        params = {"before": delivered_before}
        return await self._write((), lambda tx: tx.execute(tx.sql.prune_webhooks, params))

    # ------------------------------------------------------------ dashboard sessions

    async def save_dashboard_session(self, session: DashboardSession, now: float) -> None:
        async def save(tx: Transaction) -> None:
            await tx.execute(tx.sql.forget_expired_sessions, (now,))
            await tx.execute(tx.sql.insert_session, codec.dashboard_session_to_row(session))

        await self._write([], save)

    async def dashboard_session(self, key: str, kind: str) -> DashboardSession | None:
        row = await self._read_one(self._sql.session, (key, kind))
        return None if row is None else codec.dashboard_session_from_row(row)

    async def delete_dashboard_session(self, key: str, kind: str) -> DashboardSession | None:
        """Of two replicas redeeming one login link at once, only one gets it."""
        row = await self._write([], lambda tx: tx.one(tx.sql.delete_session, (key, kind)))
        return None if row is None else codec.dashboard_session_from_row(row)


async def _nothing(tx: Transaction) -> None:
    """The change of a write that only appends audit entries."""
