"""The control plane's application service: the in-memory desired/observed state.

It owns the authoritative snapshot (epoch + holds), each agent's desired state
and observations, and the batch writer to the store. With several replicas on one
database, it also shows the agents another replica serves, from the rows that
replica writes (``absorb``): any replica gives the same per-laptop answer.

Transports plug in through ``Subscriber``: a stream session is told *that* its
agent's desired state moved and pulls the current directive itself, so bursts of
changes coalesce and a slow stream never delays the others (the go-control-plane
split of cache and session).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import heapq
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from control.decisions import NO_DECISION, Decision, decision_for
from control.domain import (
    AgentStatus,
    CaptureReport,
    Compliance,
    CompliancePolicy,
    ComplianceState,
    Desired,
    Hold,
    HoldDraft,
    HoldKind,
    Mode,
    Scope,
    UploadDecision,
    draft_hold,
    evaluate,
    fleet_compliant,
    is_settled,
    opt_out_hold_id,
    reconcile_desired,
    validate_agent_id,
    validate_labels,
)
from control.domain.audit import AuditRecord
from control.domain.identity import Principal
from control.domain.labels import label_mismatch
from control.domain.readiness import UNSAID, HelloFacts
from control.errors import (
    Conflict,
    KillswitchError,
    NotFound,
    PermissionDenied,
    StoreError,
    shown,
)
from control.events import PlaneObserver
from control.evidence import EvidenceLedger
from control.freshness import SharedView
from control.known_holds import KnownHolds
from control.labelling import LabelImport, adopt_decided, note_report, relabel_records
from control.store import (
    AgentChanges,
    DecidedLabels,
    LoadedState,
    RunChange,
    RunCommit,
    Store,
    StoredAgent,
    ViolationEvidence,
)
from control.store_health import StoreHealth

log = structlog.get_logger("killswitch.plane")

# Most urgent first: what an SRE must look at during an incident.
SEVERITY = [
    ComplianceState.VIOLATION,
    ComplianceState.FAILED,
    ComplianceState.OVERDUE,
    ComplianceState.OFFLINE_AT_RISK,
    ComplianceState.NEVER_SEEN,
    ComplianceState.PENDING,
    ComplianceState.RESUME_PENDING,
    ComplianceState.STOP_REPORTED,
    ComplianceState.VERIFIED_STOPPED,
    ComplianceState.OFFLINE_LEASE_EXPIRED,
    ComplianceState.OFFLINE,
    ComplianceState.CAPTURING,
]
assert set(SEVERITY) == set(ComplianceState), "every state needs a place in the order"
_SEVERITY_RANK = {state: rank for rank, state in enumerate(SEVERITY)}


class Subscriber(Protocol):
    """A live stream to one agent, as the plane sees it."""

    def notify(self) -> None:
        """The agent's desired state changed: send the current directive."""

    def close(self, reason: str) -> None:
        """End the stream (a newer stream for the same agent took over)."""


@dataclass(frozen=True, slots=True)
class DirectiveSpec:
    epoch: int
    desired: Desired
    heartbeat_interval: float
    lease_ttl: float
    decision: Decision = NO_DECISION


@dataclass(frozen=True, slots=True)
class LeaseDecision:
    granted: bool
    ttl: float
    reason: str


@dataclass(slots=True)
class AgentEntry:
    agent_id: str
    labels: dict[str, str]
    desired: Desired
    status: AgentStatus
    subscriber: Subscriber | None = None
    # last_seen as of the newest row handed to the store, and when that was.
    last_seen_saved: float = 0.0
    row_saved_at: float = 0.0
    # The lease expiry the store holds: written one TTL ahead of the real expiry, so
    # renewals need a write only every few rounds and a restarted server never thinks
    # a lease ended before it really did.
    lease_bound_saved: float = 0.0
    # Whether the newest row handed to the store shows a silent stream: the next word
    # from the agent must be written at once, or other replicas would keep it silent.
    silent_saved: bool = False
    # Set while another replica's row is the truth about this agent: ``status`` is
    # derived from it. This replica never writes such an entry.
    remote: StoredAgent | None = None


@dataclass(frozen=True, slots=True)
class AgentView:
    agent_id: str
    labels: Mapping[str, str]
    desired: Desired
    status: AgentStatus
    compliance: Compliance


@dataclass(frozen=True, slots=True)
class AgentFilter:
    state: ComplianceState | None = None
    match_labels: Mapping[str, str] = field(default_factory=dict)
    hold_id: str = ""


@dataclass(frozen=True, slots=True)
class StatusSummary:
    epoch: int
    holds: list[Hold]
    total: int
    by_state: dict[ComplianceState, int]
    compliant: bool
    settled: int
    unsettled: list[AgentView]


OPT_OUT_DEFAULT_REASON = "the laptop's owner opted out of capture"


@dataclass(frozen=True, slots=True)
class Census:
    epoch: int
    by_state: dict[ComplianceState, int]
    by_mode: dict[Mode, int]
    connected_streams: int
    active_holds: int
    # Agents whose own report contradicts the labels the server decides for them.
    label_mismatches: int = 0
    # Events the ingest gateway accepted dated after their agent's stop (0 expected).
    events_accepted_after_pause: int = 0


def new_hold_id() -> str:
    return f"hold-{secrets.token_hex(6)}"


def new_replica_id() -> str:
    """Unique per process: a restarted replica's old rows read as another, dead, one."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


# A replica that has not beaten for this many probe intervals is gone: the agents
# its rows show connected are shown disconnected (since its last beat). A replica
# without its database for as long sheds its streams.
REPLICA_SILENT_BEATS = 5
# The database is lost to a replica once no beat has succeeded for this many probe
# intervals: one late or failed beat (a busy event loop, a dropped connection) is not.
STORE_ANSWER_WINDOW_BEATS = 2.5
# How often the store is probed with a beat (a durable write).
STORE_PROBE_SECONDS = 2.0
# How long a stopping replica waits to write what it holds (a healthy store writes a
# 10,000-agent flush in well under a second; one that is away would take the pool's
# 10 s connection timeout, or for ever).
STOP_FLUSH_SECONDS = 3.0


class EpochUnknown(KillswitchError):
    """An agent claims an epoch the store has not reached, even freshly read: a lying
    agent, or a database restored from an older backup. No replica can serve it."""


class ControlPlane:
    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float],
        policy: CompliancePolicy | None = None,
        lease_ttl: float = 60.0,
        flush_interval: float = 0.25,
        last_seen_save_interval: float = 60.0,
        before_fanout: Callable[[], None] = lambda: None,
        observer: PlaneObserver | None = None,
        store_probe_interval: float = STORE_PROBE_SECONDS,
        replica_id: str = "",
    ) -> None:
        self._store = store
        self._clock = clock
        self.policy = policy or CompliancePolicy()
        self.lease_ttl = lease_ttl
        self._flush_interval = flush_interval
        # 10,000 agents heartbeating every 10 s would otherwise rewrite 1,000 rows a second
        # only to move last_seen; memory stays exact, the stored copy may lag this much.
        self.last_seen_save_interval = last_seen_save_interval
        self._epoch = 0
        self._holds = KnownHolds()
        self._agents: dict[str, AgentEntry] = {}
        self._dirty: set[str] = set()
        # Changed figures only (see ``observe_upload``): written with the agent's next row,
        # or at the liveness cadence, and at stop.
        self._figures_unsaved: set[str] = set()
        # One set per ingest gateway's watch: see ``watch_upload_allowances``.
        self._upload_watchers: list[set[str]] = []
        # Audit entries about agent rows (violations) and the labels operators decided
        # ride in the next flush's transaction.
        self._pending_audit: list[AuditRecord] = []
        self._pending_labels: list[DecidedLabels] = []
        self._holds_lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        self.store_health = StoreHealth(STORE_ANSWER_WINDOW_BEATS * store_probe_interval)
        self._reported_stale = False
        self._streams_shed = False
        # Whether another replica was beating at the last read: somewhere to send
        # agents when this one loses its database.
        self._others_alive = False
        self._store_probe_interval = store_probe_interval
        # How this process signs its agent rows and its beats.
        self.replica_id = replica_id or new_replica_id()
        # Agents another replica serves (their entries have ``remote`` set).
        self._remote: set[str] = set()
        # Violation evidence and acknowledgements, from every replica.
        self._evidence = EvidenceLedger(self.replica_id)
        self.view = SharedView(lease_ttl, sole_writer=store.sole_writer)
        # One catch-up read at a time, however many agents ask for one.
        self._catching_up: asyncio.Task[None] | None = None
        # Runs before a change is pushed to the whole fleet (the server tunes the GC).
        self._before_fanout = before_fanout
        self.observer = observer or PlaneObserver()

    def now(self) -> float:
        return self._clock()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> LoadedState:
        """Rebuild memory from the store; the rest of the state is for the other services."""
        self._store.report_failures_to(self.store_health.failed)
        read_started = self.view.read_starting()
        state = await self._store.load()
        self.view.adopted(read_started)
        self._epoch = state.shared.epoch
        self._holds = KnownHolds(state.shared.holds)
        now = self._clock()
        for stored in state.agents:
            self._remember(stored)
        self.adopt_violations(state.shared.violation_acks, state.shared.violations)
        self._reconcile_all(now)
        self.store_health.restart()
        self._flusher = asyncio.create_task(self._flush_loop(), name="agent-flush")
        self._prober = asyncio.create_task(self._probe_loop(), name="store-probe")
        log.info(
            "plane_started",
            epoch=self._epoch,
            agents=len(self._agents),
            active_holds=len(self.active_holds()),
        )
        return state

    def _remember(self, stored: StoredAgent) -> AgentEntry:
        """A stored row as this replica's own: not connected, to a process that has
        just started or has just been chosen by the agent."""
        status = dataclasses.replace(stored.status, connected=False)
        if status.first_seen is not None and (
            stored.status.connected or status.disconnected_at is None
        ):
            status.disconnected_at = status.last_seen
        self._remote.discard(stored.agent_id)
        entry = self._agents[stored.agent_id] = AgentEntry(
            stored.agent_id,
            stored.labels,
            stored.desired,
            status,
            lease_bound_saved=status.lease_expires_at or 0.0,
        )
        self._evidence.apply(stored.agent_id, status)
        return entry

    async def recall(self, agent_id: str) -> None:
        """Before an agent new to this replica connects, fetch what another replica knew.

        Its history (and above all a sticky VIOLATION) must follow it when it fails over.
        """
        entry = self._agents.get(agent_id)
        if entry is not None and entry.remote is None:
            return
        stored = await self._store.load_agent(agent_id)
        entry = self._agents.get(agent_id)
        if stored is not None and (entry is None or entry.remote is not None):
            self._reconcile(self._remember(stored), self.active_holds(), self._clock())
            log.info("agent_recalled", agent_id=agent_id, violation=bool(stored.status.violation))

    async def stop(self) -> None:
        for task in (self._flusher, self._prober):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._flusher = self._prober = None
        self._dirty |= self._figures_unsaved
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
                agents_unsaved=sorted(self._dirty)[:50],
                agents_unsaved_count=len(self._dirty),
                audit_entries_unsaved=len(self._pending_audit),
                violation_evidence_unsaved=self._evidence.pending,
            )

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            try:
                await self.flush()
            except Exception:
                # Kept for the next flush; whether the database is lost is the probe's call.
                log.exception("agent_flush_failed", pending=len(self._dirty))

    async def _probe_loop(self) -> None:
        """Beat every interval (the database answering is what the probe wants to know;
        a store that hangs counts as lost), and write what has gone silent."""
        while True:
            await asyncio.sleep(self._store_probe_interval)
            self._mark_newly_silent()
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow the
                # cancellation that stop() sends, and stop() would then wait for ever.
                async with asyncio.timeout(self._store_probe_interval):
                    await self._store.beat(self.replica_id)
            except Exception as exc:
                self.store_health.failed(exc)
            else:
                self.store_health.beat_succeeded()
            self.store_health.check()
            self._report_view_freshness()
            self._shed_streams_if_lost()

    def _mark_newly_silent(self) -> None:
        """Other replicas take a connected row of a beating replica as a live agent,
        unless the row itself shows the stream silent: write those rows once."""
        stale = self._clock() - self.policy.silence_timeout
        for entry in self._agents.values():
            last_seen = entry.status.last_seen
            if (
                entry.subscriber is not None
                and not entry.silent_saved
                and last_seen is not None
                and last_seen < stale
            ):
                self._dirty.add(entry.agent_id)

    @property
    def store_healthy(self) -> bool:
        """Whether the store takes writes (``StoreHealth``). Not, and no lease is granted
        or renewed until it does: every agent fails closed within one lease TTL."""
        return self.store_health.healthy

    def _report_view_freshness(self) -> None:
        stale = self.view.stale
        if stale is self._reported_stale:
            return
        self._reported_stale = stale
        self._streams_shed = False
        if stale:
            log.error("view_stale", detail=self.view.describe_staleness())
        else:
            log.warning("view_current", detail="granting and renewing leases again")

    def _shed_streams_if_lost(self) -> None:
        """Once the other replicas take this one for dead (no beats), end its streams:
        its agents fail closed either way, but on a replica that still has the database
        they get their leases back, and their state is seen again. The agents service
        refuses new streams meanwhile, so they do not come straight back."""
        if self.leasing:
            self._streams_shed = False
        if not self.hands_off_agents() or self._streams_shed:
            return
        # A stale view with a working database sheds at once (its beats go on, so other
        # replicas take the rows it writes as they are); a lost database waits until the
        # others take it for dead.
        if (
            not self.store_healthy
            and self.store_health.silent_for() < REPLICA_SILENT_BEATS * self._store_probe_interval
        ):
            return
        self._streams_shed = True
        live = [e.subscriber for e in self._agents.values() if e.subscriber is not None]
        for subscriber in live:
            subscriber.close(self.sent_elsewhere_because())
        log.warning("streams_shed", streams=len(live), detail="agents move to other replicas")

    def hands_off_agents(self) -> bool:
        """Without its database, and with another replica to go to, this replica sends
        agents away. Alone, it keeps them: their leases end either way, and they are
        back at once when the database is (a refused agent backs off for minutes)."""
        return not self.leasing and self._others_alive

    @property
    def leasing(self) -> bool:
        """Whether this replica may grant leases now: its database takes writes and its
        view of the holds is recent. Readiness says the same."""
        return self.store_healthy and not self.view.stale

    def why_not_leasing(self) -> str:
        """One line for ``/readyz``; empty while leasing."""
        if not self.store_healthy:
            return self.store_health.cause
        if self.view.stale:
            return self.view.describe_staleness()
        return ""

    def sent_elsewhere_because(self) -> str:
        """What an agent this replica turns away is told."""
        return f"{self.why_not_leasing()}; connect to another replica"

    async def flush(self) -> None:
        """Write pending violation evidence, then changed agents and pending audit in one
        transaction; on failure keep all of it."""
        await self._evidence.flush(self._store)
        if not self._dirty and not self._pending_audit and not self._pending_labels:
            return
        batch, self._dirty = self._dirty, set()
        self._figures_unsaved -= batch
        audit, self._pending_audit = self._pending_audit, []
        labels, self._pending_labels = self._pending_labels, []
        rows = []
        now = self._clock()
        for agent_id in batch:
            entry = self._agents[agent_id]
            if entry.remote is not None:
                continue  # the replica serving it writes it
            entry.last_seen_saved = entry.status.last_seen or 0.0
            entry.row_saved_at = now
            entry.silent_saved = now - entry.last_seen_saved > self.policy.silence_timeout
            # A copy: the store may read it on another thread while the loop moves on.
            # Shallow is enough: record_* replace `channels`, never mutate it.
            lease = entry.status.lease_expires_at
            status = dataclasses.replace(
                entry.status,
                lease_expires_at=None if lease is None else max(lease, entry.lease_bound_saved),
            )
            rows.append(
                StoredAgent(agent_id, entry.labels, entry.desired, status, self.replica_id, now)
            )
        try:
            await self._store.save_agents(rows, audit, labels)
        except BaseException:
            self._dirty |= batch
            self._pending_audit[:0] = audit
            self._pending_labels[:0] = labels
            raise

    # ------------------------------------------------------------ audit

    def audit_record(
        self,
        by: Principal,
        action: str,
        *,
        target: str = "",
        reason: str = "",
        ticket: str = "",
        result: str = "ok",
        detail: str = "",
    ) -> AuditRecord:
        actor = by.name if by.authenticated else f"unverified:{by.name}"
        return AuditRecord(
            self._clock(), actor, by.role.value, action, target, reason, ticket, result, detail
        )

    def hold_created_record(
        self, by: Principal, draft: HoldDraft, *, detail: str = ""
    ) -> AuditRecord:
        return self.audit_record(
            by,
            "hold.create",
            target=f"{draft.id} {draft.kind.value} {draft.scope.describe()}",
            reason=draft.reason,
            ticket=draft.ticket,
            detail=detail,
        )

    async def audit(self, record: AuditRecord) -> None:
        """An action that changed nothing else (a denial, a failure)."""
        await self._store.append_audit([record])

    # ------------------------------------------------------------ holds

    @property
    def epoch(self) -> int:
        return self._epoch

    def active_holds(self) -> list[Hold]:
        return self._holds.active()

    def hold(self, hold_id: str) -> Hold:
        return self._holds.get(hold_id)

    async def create_hold(
        self,
        scope: Scope,
        reason: str,
        ticket: str,
        by: Principal,
        kind: HoldKind = HoldKind.INCIDENT,
        *,
        keep_spool: bool = False,
        reactivate: str = "",
    ) -> tuple[Hold, int]:
        """``reactivate``: the id of a hold to re-activate in place if it exists lifted
        (``Store.reactivate_hold``), rather than a new hold."""
        created_by = by.name
        draft = draft_hold(
            hold_id=reactivate or new_hold_id(),
            kind=kind,
            scope=scope,
            reason=reason,
            ticket=ticket,
            created_by=created_by,
            created_at=self._clock(),
            keep_spool=keep_spool,
        )
        record = self.hold_created_record(by, draft, detail="keep_spool" if keep_spool else "")
        async with self._holds_lock:
            commit = self._store.reactivate_hold if reactivate else self._store.create_hold
            hold = await commit(draft, record)
            caught_up = await self._apply_commit([hold], hold.created_epoch)
        self._announce_adopted(*caught_up)
        self.observer.hold_changed(hold, epoch=hold.created_epoch, at=self._clock())
        covered = sum(1 for e in self._agents.values() if hold.id in e.desired.hold_ids)
        log.info(
            "hold_created",
            hold_id=hold.id,
            operator=created_by,
            scope=scope.describe(),
            reason=hold.reason,
            ticket=hold.ticket,
            epoch=hold.created_epoch,
            covered=covered,
        )
        return hold, covered

    async def lift_hold(self, hold_id: str, by: Principal, *, detail: str = "") -> Hold:
        """Callers check who may lift what (an approved request, the laptop's owner)."""
        hold = self.hold(hold_id)
        record = self.audit_record(
            by, "hold.lift", target=f"{hold_id} {hold.kind.value}", detail=detail
        )
        return await self.commit_lift(
            lambda at: self._store.lift_hold(hold_id, by.name, at, record), by.name
        )

    async def commit_lift(self, commit: Callable[[float], Awaitable[Hold]], lifted_by: str) -> Hold:
        """Run the store's lift transaction under the holds lock, then push the new epoch."""
        async with self._holds_lock:
            hold = await commit(self._clock())
            caught_up = await self._apply_commit([hold], hold.lifted_epoch)
        self._announce_adopted(*caught_up)
        self.observer.hold_changed(hold, epoch=hold.lifted_epoch, at=self._clock())
        still_paused = sum(
            1
            for e in self._agents.values()
            if e.desired.mode is Mode.PAUSED and hold.covers(e.agent_id, e.labels)
        )
        log.info(
            "hold_lifted",
            hold_id=hold.id,
            operator=lifted_by,
            epoch=hold.lifted_epoch,
            still_paused_by_other_holds=still_paused,
        )
        return hold

    async def commit_run(self, change: RunChange, audit: Sequence[AuditRecord]) -> RunCommit:
        """A runbook step and its hold changes in one transaction, then the fan-out."""
        async with self._holds_lock:
            commit = await self._store.commit_run(change, audit)
            caught_up = await self._apply_commit(commit.holds, commit.epoch)
        self._announce_adopted(*caught_up)
        for hold in commit.holds:
            self.observer.hold_changed(hold, epoch=commit.epoch, at=self._clock())
        if commit.holds:
            log.info(
                "run_holds_changed",
                run_id=change.run.id,
                epoch=commit.epoch,
                holds=[h.id for h in commit.holds],
            )
        return commit

    async def adopt(self, epoch: int, holds: Sequence[Hold], read_started: float) -> list[Hold]:
        """Take the holds and epoch another replica committed; returns the changed holds.

        Level-triggered: whatever the notification said, the database's current holds
        are the truth, so a missed or repeated notification does no harm.
        ``read_started``: ``view.read_starting()`` before the read; memory is current
        as of then afterwards, whichever branch is taken.
        """
        async with self._holds_lock:
            self.view.adopted(read_started)
            if epoch < self._epoch:
                # Read before a commit of this replica's took the lock: memory is the
                # state at a later epoch already, and this would bring lifted holds back.
                return []
            changed = self._merge_holds(holds)
            # Not in a snapshot this new: archived (``KnownHolds.keep_only``).
            archived = self._holds.keep_only({h.id for h in holds})
            if not changed and not archived and epoch <= self._epoch:
                return []
            self._apply_epoch(epoch)
        self._announce_adopted(changed, epoch)
        return changed

    async def catch_up_to(self, agent_id: str, seen_epoch: int) -> None:
        """Before serving an agent, have a view at least as new as anything it has seen.

        The agent's own word (``Hello.last_applied_epoch``) and its stored row (written
        by the replica that served it) both say which epoch it has been told. A replica
        behind that would recompute its state from older holds and roll it back: it
        re-reads first (a failed read raises ``StoreError``: the agent tries another
        replica), and raises ``EpochUnknown`` if the store itself has not reached it.
        """
        entry = self._agents.get(agent_id)
        if entry is not None:
            status = entry.status
            seen_epoch = max(
                seen_epoch, entry.desired.epoch, status.acked_epoch, status.directive_sent_epoch
            )
        if seen_epoch <= self._epoch:
            return
        if self._catching_up is None or self._catching_up.done():
            self._catching_up = asyncio.create_task(self.refresh(), name="view-catch-up")
        await asyncio.shield(self._catching_up)
        if seen_epoch > self._epoch:
            raise EpochUnknown(
                f"the agent has seen epoch {seen_epoch} but the store is at epoch"
                f" {self._epoch}: a lying agent, or a database restored from a backup"
            )

    async def refresh(self) -> None:
        """Re-read the holds and the epoch from the store now."""
        read_started = self.view.read_starting()
        shared = await self._store.load_shared()
        changed = await self.adopt(shared.epoch, shared.holds, read_started)
        log.info("view_caught_up", epoch=self._epoch, adopted=len(changed))

    async def _apply_commit(self, holds: Sequence[Hold], epoch: int) -> tuple[list[Hold], int]:
        """Take the holds this replica just committed at ``epoch`` and fan out; returns
        what other replicas had changed meanwhile, with the epoch it was read at.

        Memory is the state at ``self._epoch``. If other replicas committed the epochs
        in between (epochs are dense, so a gap says so), their changes may not have
        reached this replica yet: fanning out memory plus this change would tell
        agents ALLOWED at ``epoch`` while an older, unseen, pause is in force. So read
        them first, and if that read fails fan out nothing: the resync adopts the
        commit, this one included, once the store answers. Under the holds lock.
        """
        if not epoch:  # a run step that changed no hold
            self._merge_holds(holds)
            return [], epoch
        if epoch <= self._epoch + 1:
            self._merge_holds(holds)
            self._apply_epoch(epoch)
            return [], epoch
        read_started = self.view.read_starting()
        try:
            shared = await self._store.load_shared()
        except StoreError as exc:
            log.warning("catch_up_failed", epoch=epoch, known_epoch=self._epoch, error=str(exc))
            return [], epoch
        self.view.adopted(read_started)
        # The snapshot has this commit too, and anything done to its holds since.
        own = {h.id for h in holds}
        changed = [h for h in self._merge_holds(shared.holds) if h.id not in own]
        self._apply_epoch(max(epoch, shared.epoch))
        log.info("commit_caught_up", epoch=epoch, read_epoch=shared.epoch, adopted=len(changed))
        return changed, shared.epoch

    def _merge_holds(self, holds: Sequence[Hold]) -> list[Hold]:
        return self._holds.merge(holds)

    def _announce_adopted(self, changed: Sequence[Hold], epoch: int) -> None:
        now = self._clock()
        for hold in changed:
            self.observer.hold_changed(hold, epoch=epoch, at=now)
            log.info("hold_adopted", hold_id=hold.id, active=hold.active, epoch=epoch)

    def _apply_epoch(self, epoch: int) -> None:
        self._epoch = max(self._epoch, epoch)
        self._before_fanout()
        self._reconcile_all(self._clock())

    def _reconcile_all(self, now: float) -> None:
        active = self.active_holds()
        for entry in self._agents.values():
            self._reconcile(entry, active, now)

    def _reconcile(self, entry: AgentEntry, active: Sequence[Hold], now: float) -> None:
        if entry.desired.epoch > self._epoch:
            # Its state was decided at an epoch this replica has not read yet: recomputing
            # it from older holds would roll it back. It waits for the catch-up.
            return
        desired = reconcile_desired(
            entry.desired, entry.agent_id, entry.labels, active, epoch=self._epoch, now=now
        )
        if desired is not entry.desired:
            entry.desired = desired
            self._upload_allowance_may_change(entry.agent_id)
            if entry.remote is None:
                self._dirty.add(entry.agent_id)
            if entry.subscriber is not None:
                entry.subscriber.notify()

    # ------------------------------------------------------------ inventory

    async def expect_agents(
        self,
        agents: Iterable[tuple[str, Mapping[str, str]]],
        by: Principal,
        action: str = "inventory.import",
    ) -> LabelImport:
        """Operators' labels (the inventory, a join token's) are the server's: they make
        laptops that never connect visible, and relabel known ones wherever they are
        served: every replica adopts them (``control.labelling``)."""
        checked = [(validate_agent_id(a), validate_labels(labels)) for a, labels in agents]
        tally, now = LabelImport(), self._clock()
        for agent_id, labels in checked:
            self._pending_labels.append(DecidedLabels(agent_id, labels, by.name, now))
            entry = self._agents.get(agent_id)
            if entry is None:
                self._agents[agent_id] = entry = self._new_entry(agent_id, labels, now)
                entry.status.expected_since = now
                self._dirty.add(agent_id)
                tally.added += 1
            elif entry.labels == labels:
                tally.unchanged += 1
            else:
                record = functools.partial(self.audit_record, by)
                old, entry.labels = entry.labels, labels
                self._pending_audit += relabel_records(record, agent_id, old, labels, entry.status)
                self._reconcile(entry, self.active_holds(), now)
                tally.relabelled += 1
        self._pending_audit.append(self.audit_record(by, action, detail=tally.describe()))
        await self.flush()
        log.info("agents_expected", operator=by.name, result=tally.describe())
        return tally

    def adopt_labels(self, decided: Iterable[DecidedLabels]) -> None:
        """Labels an operator decided on any replica: the agents they move into or out
        of a hold are told at once (``control.labelling.adopt_decided``)."""
        now, active = self._clock(), self.active_holds()
        for entry in adopt_decided(self._agents, decided):
            self._reconcile(entry, active, now)

    def _new_entry(self, agent_id: str, labels: dict[str, str], now: float) -> AgentEntry:
        desired = reconcile_desired(
            None, agent_id, labels, self.active_holds(), epoch=self._epoch, now=now
        )
        return AgentEntry(agent_id, labels, desired, AgentStatus())

    # ------------------------------------------------------------ agent sessions

    def connect(
        self,
        agent_id: str,
        labels: Mapping[str, str],
        subscriber: Subscriber,
        hello: HelloFacts = UNSAID,
    ) -> None:
        now = self._clock()
        checked = validate_labels(labels)
        entry = self._agents.get(agent_id)
        if entry is None:  # in no inventory, pinned by no token: trust on first use
            entry = self._agents[agent_id] = self._new_entry(agent_id, checked, now)
            reconnect = False
        else:
            reconnect = entry.status.first_seen is not None
            if entry.remote is not None:  # recall found no row: it serves it alone now
                entry.remote = None
                self._remote.discard(agent_id)
            if entry.subscriber is not None:
                entry.subscriber.close("replaced by a newer stream from the same agent")
            self._reconcile(entry, self.active_holds(), now)
        self._pending_audit += note_report(agent_id, entry.labels, entry.status, checked, now)
        # A stream newer than any stored one even if this replica's clock is behind the
        # last replica's: the store refuses rows of an older stream.
        entry.status.record_connect(max(now, (entry.status.connected_at or 0.0) + 0.001))
        entry.status.hello = hello
        entry.subscriber = subscriber
        self._dirty.add(agent_id)
        log.debug("agent_connected", agent_id=agent_id, reconnect=reconnect)
        self.observer.connected(agent_id, reconnect=reconnect, at=now)
        subscriber.notify()

    def disconnect(self, agent_id: str, subscriber: Subscriber) -> None:
        entry = self._agents.get(agent_id)
        if entry is None or entry.subscriber is not subscriber:
            return  # an older stream, already replaced
        entry.subscriber = None
        now = self._clock()
        entry.status.record_disconnect(now)
        self._dirty.add(agent_id)
        log.debug("agent_disconnected", agent_id=agent_id)
        self.observer.disconnected(agent_id, at=now)

    def close_stream(self, agent_id: str, reason: str) -> bool:
        """End the agent's live stream, if it has one (its certificate was revoked)."""
        entry = self._agents.get(agent_id)
        if entry is None or entry.subscriber is None:
            return False
        entry.subscriber.close(reason)
        return True

    def directive_for(self, agent_id: str) -> DirectiveSpec:
        entry = self._agents[agent_id]
        return DirectiveSpec(
            self._epoch,
            entry.desired,
            self.policy.heartbeat_interval,
            self.lease_ttl,
            decision_for(entry.desired, agent_id, entry.labels, self._holds),
        )

    def directive_sent(self, agent_id: str, epoch: int) -> None:
        entry = self._agents[agent_id]
        now = self._clock()
        entry.status.directive_sent_at, entry.status.directive_sent_epoch = now, epoch
        self._dirty.add(agent_id)
        self.observer.directive_sent(agent_id, epoch=epoch, mode=entry.desired.mode, at=now)

    def ack(
        self,
        agent_id: str,
        epoch: int,
        mode: Mode,
        channels: Mapping[str, bool],
        report: CaptureReport,
        *,
        purged: int = 0,
        quarantined: int = 0,
    ) -> None:
        entry = self._agents[agent_id]
        if epoch > entry.status.directive_sent_epoch:
            # An ack counts against the directive sent on this stream: an epoch this
            # stream never carried is a confused or lying agent (dropping the stream
            # would only start a reconnect loop).
            log.warning(
                "unsent_epoch_ack_ignored",
                agent_id=agent_id,
                epoch=epoch,
                sent_epoch=entry.status.directive_sent_epoch,
            )
            return
        status = entry.status
        now = self._clock()
        with self._watching_for_violation(entry):
            recorded = status.record_ack(
                epoch,
                mode,
                channels,
                report,
                now,
                desired=entry.desired,
                purged=purged,
                quarantined=quarantined,
            )
        if not recorded:
            log.info(
                "stale_ack_ignored", agent_id=agent_id, epoch=epoch, acked_epoch=status.acked_epoch
            )
        else:
            # For history checks (tests run with --log-level debug): what was acked, when.
            log.debug("agent_acked", agent_id=agent_id, epoch=epoch, mode=mode.value)
            current = epoch >= entry.desired.epoch and mode is entry.desired.mode
            latency = now - entry.desired.since if current else None
            self.observer.acked(agent_id, epoch=epoch, mode=mode, latency=latency, at=now)
        self._dirty.add(agent_id)

    def nack(self, agent_id: str, epoch: int, reason: str) -> None:
        entry = self._agents[agent_id]
        if epoch > entry.status.directive_sent_epoch:
            log.warning(
                "unsent_epoch_nack_ignored",
                agent_id=agent_id,
                epoch=epoch,
                sent_epoch=entry.status.directive_sent_epoch,
            )
            return
        now = self._clock()
        if entry.status.record_nack(epoch, reason, now):
            log.warning("agent_nacked", agent_id=agent_id, epoch=epoch, reason=reason)
            self.observer.nacked(agent_id, epoch=epoch, reason=reason, at=now)
        self._dirty.add(agent_id)

    def heartbeat(self, agent_id: str, channels: Mapping[str, bool], report: CaptureReport) -> None:
        """Changes are written at the next flush; bare liveness only now and then."""
        entry = self._agents[agent_id]
        now = self._clock()
        was_verified = entry.status.verified_at is not None
        with self._watching_for_violation(entry):
            changed = entry.status.record_heartbeat(
                channels,
                report,
                now,
                desired=entry.desired,
                heartbeat_interval=self.policy.heartbeat_interval,
            )
        if (
            changed
            or entry.silent_saved
            or now - entry.last_seen_saved >= self.last_seen_save_interval
        ):
            self._dirty.add(agent_id)
        self.observer.heartbeat(agent_id, at=now)
        if not was_verified and entry.status.verified_at is not None:
            self.observer.verified(
                agent_id,
                epoch=entry.desired.epoch,
                latency=entry.status.verified_at - entry.desired.since,
                at=now,
            )

    @contextmanager
    def _watching_for_violation(self, entry: AgentEntry) -> Iterator[None]:
        """Evidence may arrive with any report, on any replica: log it, and append it
        for every replica at the next flush."""
        had_violation = bool(entry.status.violation)
        yield
        status = entry.status
        if status.violation and status.violation_at is not None and not had_violation:
            self._dirty.add(entry.agent_id)
            self._evidence.record(
                entry.agent_id, status.violation, status.violation_at, epoch=entry.desired.epoch
            )
            log.error(
                "violation_detected",
                agent_id=entry.agent_id,
                evidence=entry.status.violation,
                epoch=entry.desired.epoch,
            )
            self.observer.violation(
                entry.agent_id, evidence=entry.status.violation, at=self._clock()
            )

    def grant_lease(self, agent_id: str) -> LeaseDecision:
        """Leases go only to agents whose effective state is ALLOWED (asked on their stream)."""
        entry = self._agents[agent_id]
        if entry.desired.mode is not Mode.ALLOWED:
            return LeaseDecision(False, 0.0, f"paused: {entry.desired.reason}")
        if not self.store_healthy:
            # A lease nobody can write down would outlive what a restart or another
            # replica knows: refuse, and let capture stop when the current one ends.
            return LeaseDecision(False, 0.0, self.store_health.cause)
        if self.view.stale:
            return LeaseDecision(False, 0.0, self.view.describe_staleness())
        # Ends one TTL after the view's time, not the grant's: see control.freshness.
        ttl = self.view.lease_seconds()
        expires_at = self._clock() + ttl
        if entry.status.record_lease(expires_at):
            self._dirty.add(agent_id)  # its stop ended: a later pause takes a new baseline
        self._upload_allowance_may_change(agent_id)
        if expires_at > entry.lease_bound_saved:
            entry.lease_bound_saved = expires_at + self.lease_ttl
            self._dirty.add(agent_id)
        log.debug("lease_granted", agent_id=agent_id, epoch=self._epoch, ttl=ttl)
        return LeaseDecision(True, ttl, "ok")

    def authorize_upload(
        self, agent_id: str, first_event_at: float, last_event_at: float, count: int
    ) -> UploadDecision:
        entry = self._agents.get(agent_id)
        if entry is None:
            return UploadDecision(False, f"unknown agent {shown(agent_id)}")
        with self._watching_for_violation(entry):
            decision = entry.status.decide_upload(
                first_event_at, last_event_at, count, self._clock(), desired=entry.desired
            )
        if not decision.allowed:  # the refusal count changed; an allowed batch changes nothing
            self._dirty.add(agent_id)
            log.info("upload_refused", agent_id=agent_id, events=count, reason=decision.reason)
            self.observer.upload_refused(agent_id, reason=decision.reason, at=self._clock())
        return decision

    def observe_upload(self, agent_id: str, observe: Callable[[AgentStatus], bool]) -> bool:
        """Apply what the ingest gateway saw (control/ingest_checks.py decides what); False
        for an agent the plane does not know.

        Any violation it finds becomes durable evidence at the next flush, and so does
        whatever ``observe`` says must be written now (True); figures alone (the last
        accepted capture time of an agent landing a batch every 30 s) are written at the
        liveness cadence, not a row per batch."""
        entry = self._agents.get(agent_id)
        if entry is None:
            return False
        with self._watching_for_violation(entry):
            urgent = observe(entry.status)
        if urgent or self._clock() - entry.row_saved_at >= self.last_seen_save_interval:
            self._dirty.add(agent_id)
        else:
            self._figures_unsaved.add(agent_id)
        return True

    async def acknowledge_violation(self, agent_id: str, by: Principal, note: str) -> str:
        entry = self._agents.get(validate_agent_id(agent_id))
        if entry is None:
            raise NotFound(f"unknown agent {shown(agent_id)}")
        evidence, flagged_at = entry.status.violation, entry.status.violation_at
        if not evidence or flagged_at is None:
            raise Conflict(f"agent {agent_id!r} has no violation to acknowledge")
        # Stored for every replica: the one serving the agent clears it there too.
        await self._store.acknowledge_violation(
            agent_id,
            flagged_at,
            self.audit_record(
                by, "agent.acknowledge_violation", target=agent_id, reason=note, detail=evidence
            ),
        )
        self.adopt_violations({agent_id: flagged_at}, [])
        log.warning(
            "violation_acknowledged",
            agent_id=agent_id,
            operator=by.name,
            note=note,
            evidence=evidence,
        )
        return evidence

    def adopt_violations(
        self, acks: Mapping[str, float], evidence: Sequence[ViolationEvidence]
    ) -> None:
        """Take acknowledgements and evidence from any replica: each agent's violation is
        its earliest evidence no acknowledgement covers (a later one is a new violation)."""
        for agent_id in self._evidence.adopt(acks, evidence):
            entry = self._agents.get(agent_id)
            if entry is not None and self._evidence.apply(agent_id, entry.status):
                self._dirty.add(agent_id)
                log.info("violation_adopted", agent_id=agent_id, evidence=entry.status.violation)

    # ------------------------------------------------------------ other replicas

    def absorb(self, changes: AgentChanges) -> None:
        """Show the agents other replicas serve, from the rows they wrote.

        A row replaces this replica's entry unless this replica serves the agent or
        knows a newer stream of it. Each call also brings every remote agent's liveness
        up to date with the beats: a replica that stopped beating has lost its streams,
        and one that beats vouches for the agents it wrote as live.
        """
        now = self._clock()
        active = self.active_holds()
        beats = changes.beat_ages
        lost_after = REPLICA_SILENT_BEATS * self._store_probe_interval
        self._others_alive = any(
            age <= lost_after for replica, age in beats.items() if replica != self.replica_id
        )
        for row in changes.rows:
            entry = self._agents.get(row.agent_id)
            if entry is not None and entry.remote is None:
                newer = (row.status.connected_at or 0.0) >= (entry.status.connected_at or 0.0)
                if entry.subscriber is not None or not newer:
                    continue
            status = dataclasses.replace(row.status)
            self._evidence.apply(row.agent_id, status)  # a row cannot wipe evidence
            if entry is None:
                entry = self._agents[row.agent_id] = AgentEntry(
                    row.agent_id, row.labels, row.desired, status
                )
            entry.remote, entry.labels, entry.desired, entry.status = (
                row,
                row.labels,
                row.desired,
                status,
            )
            self._remote.add(row.agent_id)
            self._dirty.discard(row.agent_id)
            self._upload_allowance_may_change(row.agent_id)
            self._reconcile(entry, active, now)
        # Every second for every remote agent: assignments only, no copies.
        for agent_id in self._remote:
            entry = self._agents[agent_id]
            assert entry.remote is not None
            self._apply_liveness(entry.status, entry.remote, beats, now, lost_after)

    def _apply_liveness(
        self,
        status: AgentStatus,
        row: StoredAgent,
        beat_ages: Mapping[str, float],
        now: float,
        lost_after: float,
    ) -> None:
        status.connected, status.disconnected_at = row.status.connected, row.status.disconnected_at
        if not status.connected:
            return
        age = beat_ages.get(row.written_by)
        if age is None or age > lost_after:
            status.connected = False
            status.disconnected_at = now - age if age is not None else row.written_at
            return
        last_seen = row.status.last_seen or 0.0
        if (row.written_at or 0.0) - last_seen <= self.policy.silence_timeout:
            status.last_seen = max(last_seen, now - age)

    # ------------------------------------------------------------ self service

    def owned_by(self, owner: Principal) -> list[AgentView]:
        """Laptops labelled ``owner=<name>``: all an employee may ever see."""
        return [v for v in self.views() if v.labels.get("owner") == owner.name]

    def _owned_entry(self, agent_id: str, owner: Principal) -> AgentEntry:
        entry = self._agents.get(agent_id)
        if entry is None or entry.labels.get("owner") != owner.name:
            # The same answer for "no such laptop": employees learn nothing about others.
            raise PermissionDenied(f"{owner.name} does not own a laptop {shown(agent_id)}")
        return entry

    def _opt_outs(self, agent_id: str) -> list[Hold]:
        return [
            h
            for h in self.active_holds()
            if h.kind is HoldKind.OPT_OUT and h.scope.agent_ids == frozenset({agent_id})
        ]

    async def opt_out(self, agent_id: str, owner: Principal, reason: str) -> tuple[Hold, int]:
        self._owned_entry(agent_id, owner)
        if existing := self._opt_outs(agent_id):
            raise Conflict(f"{agent_id} is already opted out (hold {existing[0].id})")
        return await self.create_hold(
            Scope.agents([agent_id]),
            reason.strip() or OPT_OUT_DEFAULT_REASON,
            "",
            owner,
            HoldKind.OPT_OUT,
            reactivate=opt_out_hold_id(agent_id),
        )

    async def opt_in(self, agent_id: str, owner: Principal) -> Hold:
        """Only the owner lifts an opt-out; no resume request or runbook reaches it."""
        self._owned_entry(agent_id, owner)
        holds = self._opt_outs(agent_id)
        if not holds:
            raise NotFound(f"{agent_id} has no opt-out to lift")
        return await self.lift_hold(holds[0].id, owner, detail="owner opted back in")

    # ------------------------------------------------------------ queries

    def _matching(self, agent_filter: AgentFilter) -> Iterator[tuple[AgentEntry, Compliance]]:
        now = self._clock()
        scope = self.hold(agent_filter.hold_id).scope if agent_filter.hold_id else None
        wanted = agent_filter.match_labels
        policy = self.policy
        for entry in self._agents.values():
            if scope is not None and not scope.covers(entry.agent_id, entry.labels):
                continue
            if wanted and any(entry.labels.get(k) != v for k, v in wanted.items()):
                continue
            verdict = evaluate(entry.desired, entry.status, now=now, policy=policy)
            if agent_filter.state is None or verdict.state is agent_filter.state:
                yield entry, verdict

    @staticmethod
    def _urgency(match: tuple[AgentEntry, Compliance]) -> tuple[int, str]:
        return _SEVERITY_RANK[match[1].state], match[0].agent_id

    def watch_upload_allowances(self) -> set[str]:
        """A set the plane adds every agent to whose upload allowance may have changed:
        a lease granted, its desired state decided anew, its row adopted from another
        replica. The watcher empties it as it reads; ``unwatch_upload_allowances`` ends
        it. (Lease ends need no word: the copy holds each lease's end.)"""
        changed: set[str] = set()
        self._upload_watchers.append(changed)
        return changed

    def unwatch_upload_allowances(self, changed: set[str]) -> None:
        self._upload_watchers = [w for w in self._upload_watchers if w is not changed]

    def _upload_allowance_may_change(self, agent_id: str) -> None:
        for watcher in self._upload_watchers:
            watcher.add(agent_id)

    def upload_allowances_of(self, agent_ids: Iterable[str]) -> dict[str, float | None]:
        """``upload_allowances`` for these agents only; None for any not allowed now."""
        now, leasing = self._clock(), self.leasing
        allowed: dict[str, float | None] = {}
        for agent_id in agent_ids:
            entry = self._agents.get(agent_id)
            allowed[agent_id] = (
                entry.status.upload_allowed_until(entry.desired, now)
                if leasing and entry is not None
                else None
            )
        return allowed

    def upload_allowances(self) -> dict[str, float]:
        """Every agent whose batches may land now, with its lease's end (see
        ``AgentStatus.upload_allowed_until``): what the ingest gateway's copy holds. None
        from a replica that cannot lease: its view may be too old to allow anything."""
        every = self.upload_allowances_of(self._agents)
        return {agent_id: until for agent_id, until in every.items() if until is not None}

    def desired_and_status(self, agent_id: str) -> tuple[Desired, AgentStatus] | None:
        """What an upload verdict needs, without evaluating compliance (a verdict per batch)."""
        entry = self._agents.get(agent_id)
        return None if entry is None else (entry.desired, entry.status)

    def agent_view(self, agent_id: str) -> AgentView | None:
        """One agent as of now, or ``None`` if the plane has never heard of it."""
        entry = self._agents.get(agent_id)
        if entry is None:
            return None
        verdict = evaluate(entry.desired, entry.status, now=self._clock(), policy=self.policy)
        return AgentView(entry.agent_id, entry.labels, entry.desired, entry.status, verdict)

    def snapshot(
        self, agent_filter: AgentFilter = AgentFilter()
    ) -> list[tuple[str, Mapping[str, str], Desired, AgentStatus, Compliance]]:
        """``(agent_id, labels, desired, status, compliance)`` of every matching agent, in no
        particular order: an ``AgentView``'s fields without building one (a third of the
        cost at 10,000 agents), for callers that filter, sort and page by their own key."""
        return [
            (e.agent_id, e.labels, e.desired, e.status, c) for e, c in self._matching(agent_filter)
        ]

    def agent_records(self) -> list[tuple[str, Mapping[str, str], AgentStatus]]:
        """``(agent_id, labels, status)`` of every agent, no verdict evaluated: for readers
        of raw facts (readiness), a fraction of ``snapshot``'s cost."""
        return [(e.agent_id, e.labels, e.status) for e in self._agents.values()]

    def census(self) -> Census:
        """Fleet-wide counts in one pass: what a Prometheus scrape reads."""
        by_state: dict[ComplianceState, int] = dict.fromkeys(ComplianceState, 0)
        by_mode: dict[Mode, int] = dict.fromkeys(Mode, 0)
        connected = mismatched = after_pause = 0
        for entry, verdict in self._matching(AgentFilter()):
            after_pause += entry.status.events_accepted_after_pause
            by_state[verdict.state] += 1
            by_mode[entry.desired.mode] += 1
            connected += entry.subscriber is not None
            mismatched += bool(label_mismatch(entry.labels, entry.status.reported_labels))
        holds = len(self.active_holds())
        return Census(self._epoch, by_state, by_mode, connected, holds, mismatched, after_pause)

    def views(self, agent_filter: AgentFilter = AgentFilter()) -> list[AgentView]:
        """Agents matching the filter, most urgent first, then by id."""
        matches = sorted(self._matching(agent_filter), key=self._urgency)
        return [AgentView(e.agent_id, e.labels, e.desired, e.status, c) for e, c in matches]

    def status(
        self, agent_filter: AgentFilter = AgentFilter(), unsettled_limit: int = 0
    ) -> StatusSummary:
        """Counts for every matching agent; full rows only for the most urgent unsettled ones.

        Operators poll this during an incident, so it must stay cheap at fleet scale.
        """
        by_state: dict[ComplianceState, int] = {}
        unsettled: list[tuple[AgentEntry, Compliance]] = []
        total = 0
        for entry, verdict in self._matching(agent_filter):
            total += 1
            by_state[verdict.state] = by_state.get(verdict.state, 0) + 1
            if not is_settled(entry.desired.mode, verdict.state):
                unsettled.append((entry, verdict))
        shown = heapq.nsmallest(unsettled_limit, unsettled, key=self._urgency)
        return StatusSummary(
            epoch=self._epoch,
            holds=self.active_holds(),
            total=total,
            by_state=by_state,
            # Settled agents are compliant by definition: only the rest can spoil it.
            compliant=fleet_compliant((e.desired.mode, c.state) for e, c in unsettled),
            settled=total - len(unsettled),
            unsettled=[AgentView(e.agent_id, e.labels, e.desired, e.status, c) for e, c in shown],
        )
