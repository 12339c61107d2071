"""The transaction interface that every store's scripts are written over.

A transaction script (``control.store.scripts``) is one ``async`` function of a
``Transaction``: it reads and writes through the handful of primitives below, and is
written once for every database. Each database implements ``Transaction`` once (the
SQLite one runs its calls on its own thread, the PostgreSQL one on a pooled
connection) and says in a ``Dialect`` how its SQL differs; ``Statements`` is then
every statement the scripts run, written once here and built in that dialect.

What is not shared is what the databases do differently, not merely spell
differently: how agent rows are written in bulk, how evidence that may already be
stored is appended, and how other replicas are told of a change.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from typing import Protocol

from control.store import ViolationEvidence
from control.store import codec
from control.store import enrolment
from control.store import history
from control.store import outbox
from control.store.codec import Row

# Positional (a tuple, in the order of a codec column list) or named parameters.
Params = Sequence[Any] | Mapping[str, Any]


class Transaction(Protocol):
    """One open transaction: committed when the script returns, rolled back if it raises."""

    sql: Statements

    async def one(self, query: str, params: Params = ()) -> Row | None:
        """The first row the statement returns, if any."""

    async def all(self, query: str, params: Params = ()) -> list[Row]: ...

    async def execute(self, query: str, params: Params = ()) -> int:
        """Run a statement that returns no rows; how many rows it changed."""

    async def execute_many(self, query: str, rows: Sequence[Params]) -> None: ...

    async def upsert_agents(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Write a batch of ``codec.agent_to_row`` rows; the last row of an agent wins."""

    async def append_evidence(self, evidence: ViolationEvidence) -> bool:
        """Append it unless its id is stored already (a retry); whether it was new."""

    async def announce(self, epoch: int = 0) -> None:
        """Tell other replicas, once this commits, that shared state changed (``epoch``:
        the one allocated, if any). Nothing to do for a store with one writer."""


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one database spells what ``Statements`` needs."""

    # A positional parameter: "?" or "%s".
    placeholder: str
    # A statement written with ``:name`` parameters, in this database's style.
    named: Callable[[str], str]
    # Appended to a SELECT of rows the transaction is about to change: SQLite has no
    # row locks (one writer at a time takes the whole file), PostgreSQL has FOR UPDATE.
    lock: str
    # Insert or replace a row by its primary key, the first of ``columns``.
    replace: Callable[[str, Sequence[str]], str]


def insert_sql(table: str, columns: Sequence[str], placeholder: str) -> str:
    values = ", ".join([placeholder] * len(columns))
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({values})"


class Statements:
    """Every statement the scripts run, in one dialect. Reads of rows that the script then
    changes take the dialect's lock (see ``control.store.scripts`` for their order)."""

    def __init__(self, dialect: Dialect) -> None:
        p, lock, replace = dialect.placeholder, dialect.lock, dialect.replace

        def named(param: str) -> str:
            return dialect.named(f":{param}")

        # Skip rows another writer has locked, rather than wait for them.
        skip_locked = f"{lock} SKIP LOCKED" if lock else ""

        # The counters, locked first by every transaction that moves them.
        self.epoch = "SELECT epoch FROM epoch_counter"
        self.next_epoch = "UPDATE epoch_counter SET epoch = epoch + 1 RETURNING epoch"
        self.next_label_version = "UPDATE label_counter SET version = version + 1 RETURNING version"

        select_holds = codec.select_sql("holds", codec.HOLD_COLUMNS)
        self.locked_hold = f"{select_holds} WHERE id = {p}{lock}"
        self.insert_hold = insert_sql("holds", codec.HOLD_COLUMNS, p)
        self.reactivate_hold = codec.reactivating(self.insert_hold)
        self.lift_hold = (
            f"UPDATE holds SET lifted_at = {p}, lifted_by = {p}, lifted_epoch = {p} WHERE id = {p}"
        )
        self.set_release = f"UPDATE holds SET release = {p} WHERE id = {p}"

        select_requests = codec.select_sql("resume_requests", codec.RESUME_COLUMNS)
        self.locked_request = f"{select_requests} WHERE id = {p}{lock}"
        self.replace_request = replace("resume_requests", codec.RESUME_COLUMNS)

        self.locked_run = f"SELECT run FROM runbook_runs WHERE id = {p}{lock}"
        self.insert_run = insert_sql("runbook_runs", codec.RUN_COLUMNS, p)
        self.replace_run = replace("runbook_runs", codec.RUN_COLUMNS)

        select_tokens = codec.select_sql("enroll_tokens", codec.TOKEN_COLUMNS)
        self.insert_token = insert_sql("enroll_tokens", codec.TOKEN_COLUMNS, p)
        self.locked_token = f"{select_tokens} WHERE id = {p}{lock}"
        self.take_token_use = f"UPDATE enroll_tokens SET uses_left = uses_left - 1 WHERE id = {p}"
        self.release_claim, self.valid_certificate, self.insert_claiming_certificate = (
            enrolment.statements(p)
        )

        select_certificates = codec.select_sql("certificates", codec.CERTIFICATE_COLUMNS)
        self.insert_certificate = insert_sql("certificates", codec.CERTIFICATE_COLUMNS, p)
        self.certificates = f"{select_certificates} ORDER BY issued_at, serial"
        self.locked_certificate = f"{select_certificates} WHERE serial = {p}{lock}"
        self.locked_certificates_of = (
            f"{select_certificates} WHERE subject = {p} ORDER BY issued_at, serial{lock}"
        )
        self.revoke_certificate = f"UPDATE certificates SET revoked_at = {p} WHERE serial = {p}"

        self.replace_violation_ack = replace("violation_acks", codec.VIOLATION_ACK_COLUMNS)
        self.replace_decided_labels = codec.upsert_decided_labels(p)
        self.labels_decided_since = (
            f"{codec.SELECT_DECIDED_LABELS} WHERE version > {p} ORDER BY version"
        )
        self.agents = f"{codec.SELECT_AGENTS} ORDER BY agent_id"
        self.agent = f"{codec.SELECT_AGENTS} WHERE agent_id = {p}"

        # The audit head: locked last, by every transaction that appends.
        self.audit_head = "SELECT seq, hash FROM audit_head WHERE id = 1"
        self.locked_audit_head = f"{self.audit_head}{lock}"
        self.insert_audit = insert_sql("audit_log", codec.AUDIT_COLUMNS, p)
        self.move_audit_head = f"UPDATE audit_head SET seq = {p}, hash = {p} WHERE id = 1"
        self.audit_page = (
            f"{codec.select_sql('audit_log', codec.AUDIT_COLUMNS)}"
            f" WHERE seq > {p} ORDER BY seq LIMIT {p}"
        )

        self.enqueue_webhook = dialect.named(outbox.ENQUEUE)
        self.claim_webhooks = dialect.named(outbox.CLAIM.format(lock=skip_locked))
        self.webhook_delivered = dialect.named(outbox.DELIVERED)
        self.webhook_retry = dialect.named(outbox.RETRY)
        self.prune_webhooks = dialect.named(outbox.PRUNE)

        self.hot_holds, self.hot_requests, self.hot_runs = history.hot_reads()
        # Rows another compactor is archiving are skipped, never waited for: compaction
        # takes no other lock, so it can neither deadlock with a write nor hold one up.
        self.archive_batches = history.archive_batches(named, skip_locked)
        self.archived_hold, self.archived_request, self.archived_run = history.archived_lookups(
            named
        )

        session_columns = ", ".join(codec.DASHBOARD_SESSION_COLUMNS)
        session = f"key = {p} AND kind = {p}"
        self.forget_expired_sessions = f"DELETE FROM dashboard_sessions WHERE expires_at <= {p}"
        self.insert_session = insert_sql("dashboard_sessions", codec.DASHBOARD_SESSION_COLUMNS, p)
        self.session = f"SELECT {session_columns} FROM dashboard_sessions WHERE {session}"
        self.delete_session = (
            f"DELETE FROM dashboard_sessions WHERE {session} RETURNING {session_columns}"
        )
