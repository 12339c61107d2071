"""The storage port: what the control plane needs from a durable store.

Implementations (``control.store.sqlite``, ``control.store.postgres``) must honour one
contract:

* holds and epochs are durable before a call returns; epochs are allocated by
  the store and only ever go up;
* agent rows are written in batches, and a row never goes back to an older stream:
  a replica that lost an agent to another cannot overwrite the newer replica's row;
* every state change is committed in the same transaction as the audit entries
  that describe it, and the audit log is append-only: the store chains each new
  entry to the previous one (``control.domain.audit.chain``) and moves the
  recorded head in that same transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Protocol

from control.domain import AgentStatus
from control.domain import Desired
from control.domain import Hold
from control.domain import HoldDraft
from control.domain.approvals import ResumeRequest
from control.domain.audit import AuditEntry
from control.domain.audit import AuditRecord
from control.domain.audit import ChainHead
from control.domain.identity import CertificateRecord
from control.domain.identity import EnrollToken
from control.domain.identity import Principal
from control.domain.release import Release
from control.domain.rollout import Run
from control.errors import InvalidInput
from control.errors import StoreUnavailable
from control.store.outbox import ClaimedMessage
from control.store.outbox import OutboxMessage

# Turns newly chained audit entries into webhook deliveries, in their transaction.
OutboxFeed = Callable[[Sequence[AuditEntry]], list[OutboxMessage]]


@dataclass(frozen=True, slots=True)
class StoredAgent:
    """An agent's row: what a restarted server, or another replica, rebuilds the agent's
    entry from; its live stream and the record of what was saved when are not stored."""

    agent_id: str
    labels: dict[str, str]
    desired: Desired
    status: AgentStatus
    # Which replica wrote the row, and when (by its clock): another replica reads
    # ``status.connected`` as "connected to that replica", true while it is alive.
    written_by: str = ""
    written_at: float | None = None


@dataclass(frozen=True, slots=True)
class ViolationEvidence:
    """One sighting of capture after a claimed stop, by whichever replica saw it.

    Appended once and never changed: an agent's violation is its earliest evidence
    that no operator acknowledgement covers (``violation_acks``)."""

    id: str
    agent_id: str
    flagged_at: float
    evidence: str
    # The replica that saw it, and the agent's desired epoch then.
    detected_by: str
    epoch: int


@dataclass(frozen=True, slots=True)
class DecidedLabels:
    """The labels an operator decided for one agent (an inventory import, a join token's
    pin): shared state, which every replica adopts for the agents it serves or shows.

    ``version`` is the store's: every transaction that changes labels takes the next
    one, so a replica reads only what changed since the newest version it has seen."""

    agent_id: str
    labels: dict[str, str]
    set_by: str
    set_at: float
    version: int = 0


@dataclass(frozen=True, slots=True)
class AgentChanges:
    """Agent rows other replicas wrote since a cursor, and which replicas are alive."""

    rows: list[StoredAgent]
    # Replica id -> seconds since its last beat, by the database's clock (no skew).
    beat_ages: dict[str, float]
    # Pass back to read what was written after this read.
    cursor: str


@dataclass(frozen=True, slots=True)
class DashboardSession:
    """A dashboard login link or browser session, kept where every replica finds it.

    ``key`` is a SHA-256 of the secret the browser holds, never the secret itself."""

    key: str
    kind: str  # "login" (single use, in a URL) or "session" (the cookie)
    principal: Principal
    expires_at: float


@dataclass(frozen=True, slots=True)
class SharedState:
    """What every replica must agree on: re-read whenever another replica changes it."""

    epoch: int
    holds: list[Hold]
    resume_requests: list[ResumeRequest] = field(default_factory=list)
    # Revoked certificates, serial -> subject: refused at every call and stream.
    revoked: dict[str, str] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    # Agent id -> the newest violation an operator acknowledged (its ``violation_at``).
    violation_acks: dict[str, float] = field(default_factory=dict)
    # Evidence no acknowledgement covers yet, oldest first.
    violations: list[ViolationEvidence] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LoadedState:
    """Everything a starting server reads: the shared state and every agent row."""

    shared: SharedState
    agents: list[StoredAgent]


@dataclass(frozen=True, slots=True)
class RunChange:
    """One step of a runbook run and the hold changes it makes, committed together.

    So a restarted server never finds a wave enabled that the run does not know
    about, or a run that believes in a wave the holds do not show.
    """

    run: Run
    by: str
    at: float
    create: HoldDraft | None = None
    lift_hold_id: str = ""
    # Set this active hold's release (the waves re-enabled so far).
    release: tuple[str, Release] | None = None
    # A resume request the run consumes: stored EXECUTED at this change's epoch.
    executed_request: ResumeRequest | None = None


@dataclass(frozen=True, slots=True)
class RunCommit:
    holds: list[Hold]
    # The epoch allocated for the hold changes; 0 when there were none.
    epoch: int


@dataclass(frozen=True, slots=True)
class ArchivedCounts:
    """What one compaction batch archived."""

    holds: int = 0
    requests: int = 0
    runs: int = 0

    @property
    def total(self) -> int:
        return self.holds + self.requests + self.runs


class Store(Protocol):
    # True when no other process commits to this database (SQLite: one server per data
    # dir), so memory is always the current shared state; False with replicas.
    sole_writer: bool

    async def load(self) -> LoadedState:
        """Everything needed to rebuild the in-memory state after a restart."""

    async def create_hold(self, draft: HoldDraft, audit: AuditRecord) -> Hold:
        """Commit the hold durably with a freshly allocated epoch."""

    async def reactivate_hold(self, draft: HoldDraft, audit: AuditRecord) -> Hold:
        """As ``create_hold``, but a lifted hold with the draft's id (archived or not) is
        re-activated in place with the draft's fields and a fresh epoch, rather than
        refused: no new row. Raises ``Conflict`` while that hold is still active."""

    async def lift_hold(
        self, hold_id: str, lifted_by: str, lifted_at: float, audit: AuditRecord
    ) -> Hold:
        """Commit the lift durably with a freshly allocated epoch.

        Raises ``NotFound`` for an unknown hold and ``Conflict`` if already lifted.
        """

    async def save_agents(
        self,
        agents: Sequence[StoredAgent],
        audit: Sequence[AuditRecord] = (),
        labels: Sequence[DecidedLabels] = (),
    ) -> None:
        """Upsert a batch of agent rows, the labels operators decided and the audit
        entries they carry, in one transaction.

        Decided labels that differ from the stored ones take the next label version, and
        every replica is told; identical ones change nothing. An agent's decided labels
        are its ``labels`` in every row read back (``load``, ``load_agent``,
        ``agents_written_since``), whatever the row was written with: the replica
        serving it may not have adopted them yet."""

    async def labels_decided_since(self, version: int) -> list[DecidedLabels]:
        """Decided labels changed after ``version`` (0 for all), oldest version first.

        Versions become visible in order: once a read returns version ``v``, no later
        read returns a new version at or below ``v``, so the newest version read is the
        next read's cursor."""

    # Set by the server when webhooks are configured (``control.webhooks``).
    outbox_feed: OutboxFeed | None

    async def enqueue_webhooks(self, messages: Sequence[OutboxMessage]) -> None:
        """Messages for events that have no audit entry (the fleet turning compliant)."""

    async def claim_webhooks(self, now: float, until: float, limit: int) -> list[ClaimedMessage]:
        """Up to ``limit`` undelivered messages due by ``now``, oldest first, not due again
        (for another sender) before ``until``."""
        ...

    async def webhook_delivered(self, message_id: int, now: float) -> None: ...

    async def webhook_retry(self, message_id: int, next_at: float, error: str) -> None: ...

    async def prune_webhooks(self, delivered_before: float) -> int:
        """Delete messages delivered before then; returns how many."""
        ...

    async def append_audit(self, records: Sequence[AuditRecord]) -> None:
        """Actions that change no other state: denials, reads worth recording."""

    async def read_audit(self, after_seq: int, limit: int) -> tuple[list[AuditEntry], ChainHead]:
        """Entries with ``seq > after_seq`` in order, at most ``limit``, and the recorded head."""

    async def save_resume_request(self, request: ResumeRequest, audit: AuditRecord) -> None:
        """Insert or replace the request (by id)."""

    async def execute_resume(
        self, request: ResumeRequest, lifted_at: float, audit: AuditRecord
    ) -> Hold:
        """Lift ``request.hold_id`` with a fresh epoch and store ``request`` as EXECUTED
        with that ``lifted_epoch``, in one transaction. Errors as ``lift_hold``."""

    async def commit_run(self, change: RunChange, audit: Sequence[AuditRecord]) -> RunCommit:
        """Refuse with ``Conflict`` unless the stored run's version is ``change.run.version
        - 1`` (no stored run for version 1): two writers never both move one run. Then
        apply the change's hold edits under one new epoch (lift, then create, then
        release), store a consumed request as EXECUTED and upsert the run, in one
        transaction with ``audit``. Errors as ``lift_hold``."""

    async def create_enroll_token(self, token: EnrollToken, audit: AuditRecord) -> None: ...

    async def enrol_agent(
        self, token_id: str, secret: str, certificate: CertificateRecord, audit: AuditRecord
    ) -> EnrollToken:
        """In one transaction: take one use of the token, refuse with ``Conflict`` while
        the certificate's subject holds another certificate valid at its ``issued_at``,
        then record the certificate with ``audit``. Of two enrolments of one agent id at
        once, on one server or two, exactly one commits (``control.store.enrolment``).

        Returns the token as it was (its labels are pinned). Raises ``PermissionDenied``
        with ``check_enroll_token``'s reason when it cannot enrol; a refusal takes no use.
        """

    async def record_certificate(
        self, certificate: CertificateRecord, audit: AuditRecord | None
    ) -> None:
        """An operator's or the server's certificate (``init``, ``identities``)."""

    async def revoke_certificates(
        self, subject_or_serial: str, revoked_at: float, audit: AuditRecord
    ) -> list[CertificateRecord]:
        """Revoke every unrevoked certificate with that subject, or the one with that serial.

        Raises ``NotFound`` when nothing matches.
        """

    async def list_certificates(self) -> list[CertificateRecord]: ...

    async def load_agent(self, agent_id: str) -> StoredAgent | None:
        """One agent's stored row, for a replica it fails over to."""

    async def agents_written_since(self, cursor: str, replica_id: str) -> AgentChanges:
        """Rows written by other replicas since ``cursor`` ("" for all), and their beats.

        A row may come again in a later read; none written after a read's cursor is
        ever skipped. A single-server store has no other writers: nothing, ever."""

    async def acknowledge_violation(
        self, agent_id: str, violation_at: float, audit: AuditRecord
    ) -> None:
        """Record that the violation flagged at ``violation_at`` was acknowledged, with
        its audit entry: the replica serving the agent clears it when it next re-reads."""

    async def record_violations(
        self, found: Sequence[tuple[ViolationEvidence, AuditRecord]]
    ) -> None:
        """Append each piece of evidence and its audit entry, all in one transaction.

        Evidence already stored (the same id: a retry after an unknown outcome) is
        skipped with its entry. Nothing is ever updated or deleted; ``load_shared``
        reads what no acknowledgement covers, and every replica is told."""

    async def load_shared(self) -> SharedState:
        """Everything but the agent rows, read in one consistent snapshot: of the holds,
        resume requests and runs, only those not archived."""

    async def archive_history(self, before: float, now: float, limit: int) -> ArchivedCounts:
        """In one transaction, archive at most ``limit`` each of the holds lifted, the
        resume requests decided or expired and the runs ended before ``before``
        (``control.domain.history``): ``load`` and ``load_shared`` no longer return them.
        Active holds, open requests and active runs stay, however old; the epoch and the
        audit log are not touched. Safe to run from several replicas at once."""

    async def archived_hold(self, hold_id: str) -> Hold | None: ...

    async def archived_request(self, request_id: str) -> ResumeRequest | None: ...

    async def archived_run(self, run_id: str) -> Run | None: ...

    async def watch(self, changed: Callable[[], None]) -> None:
        """Call ``changed`` whenever another writer commits shared state; runs until
        cancelled and survives lost connections. A single-server store returns at once."""

    async def try_lead(self) -> bool:
        """Whether this process is (or has just become) the one that drives runbook runs.

        At most one process holds the lead at a time; it is given up when the process
        or its database connection dies. A single-server store always leads."""

    async def save_dashboard_session(self, session: DashboardSession, now: float) -> None:
        """Store it, and forget every session that expired before ``now``."""

    async def dashboard_session(self, key: str, kind: str) -> DashboardSession | None: ...

    async def delete_dashboard_session(self, key: str, kind: str) -> DashboardSession | None:
        """Remove it and return what it was: of two replicas redeeming one login link at
        once, only one gets it."""

    async def beat(self, replica_id: str) -> None:
        """Record that this replica is alive, by a durable write: raise ``StoreError``
        unless the store takes writes now (``StoreUnavailable`` with the cause, when it
        is known). Readiness and leases depend on it."""

    def report_failures_to(self, failed: Callable[[StoreUnavailable], None]) -> None:
        """Call ``failed`` (on the event loop) with every ``StoreUnavailable`` any call
        raises, so a failed write marks the store unhealthy at once."""

    async def close(self) -> None: ...


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def describe_database(database: str, data_dir: Path) -> str:
    """For logs and errors: never the password a DSN may carry."""
    if database.startswith(POSTGRES_SCHEMES):
        scheme, _, rest = database.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"
    return str(data_dir / "killswitch.db")


async def open_store(data_dir: Path, database: str = "") -> Store:
    """SQLite in ``data_dir`` by default; PostgreSQL for a ``postgresql://`` URL."""
    if database.startswith(POSTGRES_SCHEMES):
        from control.store.postgres import PostgresStore

        return await PostgresStore.open(database)
    if database and database != "sqlite":
        raise InvalidInput(
            f"unsupported --database {database.split(':', 1)[0]!r}: use a postgresql:// URL,"
            " or leave it out for SQLite in the data dir"
        )
    from control.store.sqlite import SqliteStore

    return await SqliteStore.open(data_dir)
