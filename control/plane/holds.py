"""Hold commits: creating, lifting and running holds, and adopting those other replicas
committed, so that agents are never told an older state than one already in force.

Every change commits in the store first, then moves the epoch in memory and fans the
new desired state out, all under one lock; a commit that skips epochs (another
replica committed in between) re-reads the holds before any agent hears of it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Sequence

import structlog

from control.domain import Hold
from control.domain import HoldKind
from control.domain import Mode
from control.domain import Scope
from control.domain import draft_hold
from control.domain import opt_out_hold_id
from control.domain.audit import AuditRecord
from control.domain.identity import Principal
from control.errors import Conflict
from control.errors import KillswitchError
from control.errors import NotFound
from control.errors import PermissionDenied
from control.errors import StoreError
from control.errors import shown
from control.plane.cache import DesiredStateCache
from control.plane.context import PlaneContext
from control.plane.entries import AgentEntry
from control.plane.membership import Membership
from control.plane.part import CachePart
from control.store import RunChange
from control.store import RunCommit

log = structlog.get_logger("killswitch.plane")

OPT_OUT_DEFAULT_REASON = "the laptop's owner opted out of capture"


def new_hold_id() -> str:
    return f"hold-{secrets.token_hex(6)}"


class EpochUnknown(KillswitchError):
    """An agent claims an epoch the store has not reached, even freshly read: a lying
    agent, or a database restored from an older backup. No replica can serve it."""


class HoldCommits(CachePart):
    def __init__(
        self,
        context: PlaneContext,
        cache: DesiredStateCache,
        membership: Membership,
    ) -> None:
        super().__init__(context, cache)
        self._membership = membership
        self._lock = asyncio.Lock()
        # One catch-up read at a time, however many agents ask for one.
        self._catching_up: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ this replica's commits

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
        record = self._context.audit.hold_created(
            by, draft, detail="keep_spool" if keep_spool else ""
        )
        store = self._context.store
        async with self._lock:
            commit = store.reactivate_hold if reactivate else store.create_hold
            hold = await commit(draft, record)
            adopted = await self._apply_commit([hold], hold.created_epoch)
        self._announce_adopted(*adopted)
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
        hold = self._cache.hold(hold_id)
        record = self._context.audit.record(
            by, "hold.lift", target=f"{hold_id} {hold.kind.value}", detail=detail
        )
        return await self.commit_lift(
            lambda at: self._context.store.lift_hold(hold_id, by.name, at, record), by.name
        )

    async def commit_lift(self, commit: Callable[[float], Awaitable[Hold]], lifted_by: str) -> Hold:
        """Run the store's lift transaction under the holds lock, then push the new epoch."""
        async with self._lock:
            hold = await commit(self._clock())
            adopted = await self._apply_commit([hold], hold.lifted_epoch)
        self._announce_adopted(*adopted)
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
        async with self._lock:
            commit = await self._context.store.commit_run(change, audit)
            adopted = await self._apply_commit(commit.holds, commit.epoch)
        self._announce_adopted(*adopted)
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

    async def _apply_commit(self, holds: Sequence[Hold], epoch: int) -> tuple[list[Hold], int]:
        """Take the holds this replica just committed at ``epoch`` and fan out; returns
        what other replicas had changed meanwhile, with the epoch it was read at.

        Memory is the state at ``cache.epoch``. If other replicas committed the epochs
        in between (epochs are dense, so a gap says so), their changes may not have
        reached this replica yet: fanning out memory plus this change would tell
        agents ALLOWED at ``epoch`` while an older, unseen, pause is in force. So read
        them first, and if that read fails fan out nothing: the resync adopts the
        commit, this one included, once the store answers. Under the holds lock.
        """
        cache = self._cache
        if not epoch:  # a run step that changed no hold
            cache.holds.merge(holds)
            return [], epoch
        if epoch <= cache.epoch + 1:
            cache.holds.merge(holds)
            cache.apply_epoch(epoch)
            return [], epoch
        view = self._membership.view
        read_started = view.read_starting()
        try:
            shared = await self._context.store.load_shared()
        except StoreError as exc:
            log.warning("catch_up_failed", epoch=epoch, known_epoch=cache.epoch, error=str(exc))
            return [], epoch
        view.adopted(read_started)
        # The snapshot has this commit too, and anything done to its holds since.
        own = {h.id for h in holds}
        changed = [h for h in cache.holds.merge(shared.holds) if h.id not in own]
        cache.apply_epoch(max(epoch, shared.epoch))
        log.info("commit_caught_up", epoch=epoch, read_epoch=shared.epoch, adopted=len(changed))
        return changed, shared.epoch

    # ------------------------------------------------------------ other replicas' commits

    async def adopt_holds(
        self, epoch: int, holds: Sequence[Hold], read_started: float
    ) -> list[Hold]:
        """Take the holds and epoch another replica committed; returns the changed holds.

        Level-triggered: whatever the notification said, the database's current holds
        are the truth, so a missed or repeated notification does no harm.
        ``read_started``: ``view.read_starting()`` before the read; memory is current
        as of then afterwards, whichever branch is taken.
        """
        cache = self._cache
        async with self._lock:
            self._membership.view.adopted(read_started)
            if epoch < cache.epoch:
                # Read before a commit of this replica's took the lock: memory is the
                # state at a later epoch already, and this would bring lifted holds back.
                return []
            changed = cache.holds.merge(holds)
            # Not in a snapshot this new: archived (``KnownHolds.keep_only``).
            archived = cache.holds.keep_only({h.id for h in holds})
            if not changed and not archived and epoch <= cache.epoch:
                return []
            cache.apply_epoch(epoch)
        self._announce_adopted(changed, epoch)
        return changed

    async def resync_holds(self) -> None:
        """Read the holds and the epoch from the store now, and adopt them."""
        read_started = self._membership.view.read_starting()
        shared = await self._context.store.load_shared()
        changed = await self.adopt_holds(shared.epoch, shared.holds, read_started)
        log.info("view_caught_up", epoch=self._cache.epoch, adopted=len(changed))

    async def catch_up_to(self, agent_id: str, seen_epoch: int) -> None:
        """Before serving an agent, have a view at least as new as anything it has seen.

        Not a plain resync: it reads only when this replica is behind, shares one read
        among every agent asking, and refuses an agent ahead of the store itself.
        The agent's own word (``Hello.last_applied_epoch``) and its stored row (written
        by the replica that served it) both say which epoch it has been told. A replica
        behind that would recompute its state from older holds and roll it back: it
        re-reads first (a failed read raises ``StoreError``: the agent tries another
        replica), and raises ``EpochUnknown`` if the store itself has not reached it.
        """
        cache = self._cache
        entry = self._agents.get(agent_id)
        if entry is not None:
            status = entry.status
            seen_epoch = max(
                seen_epoch, entry.desired.epoch, status.acked_epoch, status.directive_sent_epoch
            )
        if seen_epoch <= cache.epoch:
            return
        if self._catching_up is None or self._catching_up.done():
            self._catching_up = asyncio.create_task(self.resync_holds(), name="view-catch-up")
        await asyncio.shield(self._catching_up)
        if seen_epoch > cache.epoch:
            raise EpochUnknown(
                f"the agent has seen epoch {seen_epoch} but the store is at epoch"
                f" {cache.epoch}: a lying agent, or a database restored from a backup"
            )

    def _announce_adopted(self, changed: Sequence[Hold], epoch: int) -> None:
        now = self._clock()
        for hold in changed:
            self.observer.hold_changed(hold, epoch=epoch, at=now)
            log.info("hold_adopted", hold_id=hold.id, active=hold.active, epoch=epoch)

    # ------------------------------------------------------------ self service

    def _owned_entry(self, agent_id: str, owner: Principal) -> AgentEntry:
        entry = self._agents.get(agent_id)
        if entry is None or entry.labels.get("owner") != owner.name:
            # The same answer for "no such laptop": employees learn nothing about others.
            raise PermissionDenied(f"{owner.name} does not own a laptop {shown(agent_id)}")
        return entry

    def _opt_outs(self, agent_id: str) -> list[Hold]:
        return [
            h
            for h in self._cache.active_holds()
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
