"""The transaction scripts of every store, written once over ``Transaction``.

Each write of the ``Store`` contract is one function here, run in one transaction
with the audit entries that describe it (``commit``). With several replicas on one
PostgreSQL database, what keeps writers from stepping on each other is row locks,
taken by every script in this one order, so that they serialise and never deadlock:

1. the counter rows first: ``epoch_counter`` in every transaction that changes a hold
   (``next_epoch``; ``UPDATE ... RETURNING``, so epochs follow commit order), and
   ``label_counter`` in one that decides labels;
2. then the rows the script reads before it changes them (the ``locked_*``
   statements: ``SELECT ... FOR UPDATE``), and the rows it writes (agent rows in
   ``agent_id`` order);
3. the ``audit_head`` row last: appending audit entries moves it (``append_audit``).

SQLite takes the whole file for each write (``BEGIN IMMEDIATE``), so the order costs
it nothing and the same scripts run there unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Coroutine
from collections.abc import Sequence
from typing import Any
from typing import TypeVar

from control.domain import Hold
from control.domain import HoldDraft
from control.domain.approvals import ResumeRequest
from control.domain.approvals import executed
from control.domain.audit import AuditEntry
from control.domain.audit import AuditRecord
from control.domain.audit import ChainHead
from control.domain.identity import CertificateRecord
from control.domain.identity import EnrollToken
from control.domain.identity import check_enroll_token
from control.errors import PermissionDenied
from control.store import ArchivedCounts
from control.store import DecidedLabels
from control.store import LoadedState
from control.store import OutboxFeed
from control.store import RunChange
from control.store import RunCommit
from control.store import SharedState
from control.store import ViolationEvidence
from control.store import codec
from control.store import enrolment
from control.store import write_checks
from control.store.outbox import ClaimedMessage
from control.store.outbox import OutboxMessage
from control.store.transaction import Transaction

T = TypeVar("T")
# A transaction script: what one call of the store does, in its transaction.
Script = Callable[[Transaction], Coroutine[Any, Any, T]]

_CLAIMED_FIELDS = tuple(f.name for f in dataclasses.fields(ClaimedMessage))

# ---------------------------------------------------------------- every write


async def commit(
    tx: Transaction, records: Sequence[AuditRecord], change: Script[T], feed: OutboxFeed | None
) -> tuple[T, list[AuditEntry]]:
    """Apply ``change``, then append its audit entries and their webhook deliveries.

    ``records`` is read after ``change`` ran, so a change may fill it (only new
    evidence is audited). The caller logs the entries once this commits."""
    result = await change(tx)
    entries = await append_audit(tx, records)
    if feed is not None and entries:
        await enqueue_webhooks(tx, feed(entries))
    return result, entries


async def append_audit(tx: Transaction, records: Sequence[AuditRecord]) -> list[AuditEntry]:
    """Chain ``records`` after the stored head and move the head: the last lock a write
    takes, which serialises the appends of every replica."""
    if not records:
        return []
    head = await tx.one(tx.sql.locked_audit_head)
    assert head is not None, "the first migration inserts the audit_head row"
    entries = write_checks.chain_after(ChainHead(head["seq"], head["hash"]), records)
    await tx.execute_many(tx.sql.insert_audit, [codec.audit_to_row(e) for e in entries])
    await tx.execute(tx.sql.move_audit_head, (entries[-1].seq, entries[-1].hash))
    return entries


async def next_epoch(tx: Transaction) -> int:
    row = await tx.one(tx.sql.next_epoch)
    assert row is not None, "the first migration inserts the epoch_counter row"
    return int(row["epoch"])


async def insert_new(tx: Transaction, query: str, row: tuple[Any, ...], what: str) -> None:
    """Insert a row whose key must be new: a reused key is the caller's ``Conflict``."""
    if await tx.one(f"{query} ON CONFLICT DO NOTHING RETURNING 1", row) is None:
        raise write_checks.already_exists(what)


# ---------------------------------------------------------------- holds


async def active_hold(tx: Transaction, hold_id: str) -> Hold:
    return write_checks.active_hold(await tx.one(tx.sql.locked_hold, (hold_id,)), hold_id)


async def insert_hold(tx: Transaction, draft: HoldDraft, epoch: int) -> Hold:
    hold = Hold.committed(draft, epoch)
    await insert_new(tx, tx.sql.insert_hold, codec.hold_to_row(hold), f"hold {hold.id!r}")
    return hold


async def lift(tx: Transaction, hold_id: str, lifted_by: str, at: float, epoch: int) -> Hold:
    """The caller allocated ``epoch`` first: the epoch row is always the first lock taken."""
    hold = await active_hold(tx, hold_id)
    await tx.execute(tx.sql.lift_hold, (at, lifted_by, epoch, hold_id))
    return write_checks.lifted(hold, lifted_by, at, epoch)


async def create_hold(tx: Transaction, draft: HoldDraft) -> Hold:
    epoch = await next_epoch(tx)
    hold = await insert_hold(tx, draft, epoch)
    await tx.announce(epoch)
    return hold


async def reactivate_hold(tx: Transaction, draft: HoldDraft) -> Hold:
    hold = Hold.committed(draft, await next_epoch(tx))
    if await tx.one(tx.sql.reactivate_hold, codec.hold_to_row(hold)) is None:
        raise write_checks.still_active(hold.id)
    await tx.announce(hold.created_epoch)
    return hold


async def lift_hold(tx: Transaction, hold_id: str, lifted_by: str, lifted_at: float) -> Hold:
    epoch = await next_epoch(tx)
    hold = await lift(tx, hold_id, lifted_by, lifted_at, epoch)
    await tx.announce(epoch)
    return hold


# ---------------------------------------------------------------- resume requests and runs


async def record_executed(tx: Transaction, request: ResumeRequest, epoch: int) -> None:
    """Store ``request`` EXECUTED at ``epoch``, if it is still as it was approved."""
    write_checks.check_request_executable(
        await tx.one(tx.sql.locked_request, (request.id,)), request
    )
    await tx.execute(tx.sql.replace_request, codec.resume_to_row(executed(request, epoch)))


async def save_resume_request(tx: Transaction, request: ResumeRequest) -> None:
    write_checks.check_request_write(await tx.one(tx.sql.locked_request, (request.id,)), request)
    await tx.execute(tx.sql.replace_request, codec.resume_to_row(request))
    await tx.announce()


async def execute_resume(
    tx: Transaction, request: ResumeRequest, lifted_by: str, lifted_at: float
) -> Hold:
    epoch = await next_epoch(tx)
    hold = await lift(tx, request.hold_id, lifted_by, lifted_at, epoch)
    await record_executed(tx, request, epoch)
    await tx.announce(epoch)
    return hold


async def commit_run(tx: Transaction, change: RunChange) -> RunCommit:
    touches_holds = change.create or change.lift_hold_id or change.release
    epoch = await next_epoch(tx) if touches_holds else 0
    # After the epoch row, as every lock: two steps of one run take turns here, and the
    # second finds the version the first stored.
    stored = await tx.one(tx.sql.locked_run, (change.run.id,))
    write_checks.check_run_version(None if stored is None else stored["run"], change.run)
    holds: list[Hold] = []
    if change.lift_hold_id:
        holds.append(await lift(tx, change.lift_hold_id, change.by, change.at, epoch))
    if change.create is not None:
        holds.append(await insert_hold(tx, change.create, epoch))
    if change.release is not None:
        hold_id, release = change.release
        hold = await active_hold(tx, hold_id)
        await tx.execute(tx.sql.set_release, (codec.release_to_json(release), hold_id))
        holds.append(dataclasses.replace(hold, release=release))
    if change.executed_request is not None:
        await record_executed(tx, change.executed_request, epoch)
    row = codec.run_to_row(change.run)
    if stored is not None:
        await tx.execute(tx.sql.replace_run, row)
    else:
        # A first step inserted by another writer meanwhile: no row was there to lock.
        await insert_new(tx, tx.sql.insert_run, row, f"run {change.run.id}")
    await tx.announce(epoch)
    return RunCommit(holds, epoch)


# ---------------------------------------------------------------- agents and violations


async def save_agents(
    tx: Transaction, rows: Sequence[tuple[Any, ...]], labels: Sequence[DecidedLabels]
) -> None:
    """Decided labels take the label counter's row first (as a hold change takes the
    epoch's), in ``agent_id`` order, so two batches lock shared rows in one order."""
    if labels:
        counter = await tx.one(tx.sql.next_label_version)
        assert counter is not None, "a migration inserts the label_counter row"
        version = counter["version"]
        decided = sorted(labels, key=lambda d: d.agent_id)
        await tx.execute_many(
            tx.sql.replace_decided_labels,
            [codec.decided_labels_to_row(d, version) for d in decided],
        )
        await tx.announce()
    if rows:
        await tx.upsert_agents(rows)


async def acknowledge_violation(tx: Transaction, agent_id: str, violation_at: float) -> None:
    await tx.execute(tx.sql.replace_violation_ack, (agent_id, violation_at))
    await tx.announce()


async def record_violations(
    tx: Transaction,
    found: Sequence[tuple[ViolationEvidence, AuditRecord]],
    audit: list[AuditRecord],
) -> None:
    """Append the evidence not stored yet, and put its audit entries in ``audit``."""
    for evidence, record in found:
        if await tx.append_evidence(evidence):
            audit.append(record)
    if audit:
        await tx.announce()


# ---------------------------------------------------------------- identities


async def create_enroll_token(tx: Transaction, token: EnrollToken) -> None:
    row = codec.token_to_row(token)
    await insert_new(tx, tx.sql.insert_token, row, f"enrolment token {token.id!r}")


async def enrol_agent(
    tx: Transaction, token_id: str, secret: str, certificate: CertificateRecord
) -> EnrollToken:
    """One valid certificate per agent id: see ``control.store.enrolment``."""
    agent_id, now = certificate.subject, certificate.issued_at
    row = await tx.one(tx.sql.locked_token, (token_id,))
    token = None if row is None else codec.token_from_row(row)
    reason = check_enroll_token(token, secret, now)
    if reason or token is None:
        raise PermissionDenied(reason)
    await tx.execute(tx.sql.release_claim, (agent_id, now))
    if valid := await tx.one(tx.sql.valid_certificate, (agent_id, now)):
        raise enrolment.already_enrolled(agent_id, valid["serial"])
    claiming = (*codec.fields_of(certificate, codec.CERTIFICATE_COLUMNS), agent_id)
    if await tx.one(tx.sql.insert_claiming_certificate, claiming) is None:
        # PostgreSQL: another enrolment took the claim after our read; the insert waited
        # for it to commit, and this read (a new statement) sees its certificate.
        if valid := await tx.one(tx.sql.valid_certificate, (agent_id, now)):
            raise enrolment.already_enrolled(agent_id, valid["serial"])
        raise write_checks.already_exists(f"certificate with serial {certificate.serial}")
    await tx.execute(tx.sql.take_token_use, (token_id,))
    await tx.announce()
    return token


async def record_certificate(tx: Transaction, certificate: CertificateRecord) -> None:
    row = codec.fields_of(certificate, codec.CERTIFICATE_COLUMNS)
    what = f"certificate with serial {certificate.serial}"
    await insert_new(tx, tx.sql.insert_certificate, row, what)
    await tx.announce()


async def revoke_certificates(
    tx: Transaction, subject_or_serial: str, revoked_at: float
) -> list[CertificateRecord]:
    rows = await tx.all(tx.sql.locked_certificate, (subject_or_serial,)) or await tx.all(
        tx.sql.locked_certificates_of, (subject_or_serial,)
    )
    unrevoked = write_checks.to_revoke(subject_or_serial, rows)
    await tx.execute_many(tx.sql.revoke_certificate, [(revoked_at, c.serial) for c in unrevoked])
    await tx.announce()
    return [dataclasses.replace(c, revoked_at=revoked_at) for c in unrevoked]


# ---------------------------------------------------------------- webhooks, history, sessions


async def enqueue_webhooks(tx: Transaction, messages: Sequence[OutboxMessage]) -> None:
    if messages:
        await tx.execute_many(tx.sql.enqueue_webhook, [m.params() for m in messages])


async def claim_webhooks(
    tx: Transaction, now: float, until: float, limit: int
) -> list[ClaimedMessage]:
    rows = await tx.all(tx.sql.claim_webhooks, {"now": now, "until": until, "limit": limit})
    return [ClaimedMessage(**codec.fields_from(row, _CLAIMED_FIELDS)) for row in rows]


async def archive_history(tx: Transaction, before: float, now: float, limit: int) -> ArchivedCounts:
    """Announced to nobody: each replica forgets archived history by itself (its resync
    and its own compaction)."""
    params = {"before": before, "now": now, "limit": limit}
    return ArchivedCounts(*[await tx.execute(sql, params) for sql in tx.sql.archive_batches])


# ---------------------------------------------------------------- reads


async def read_shared(tx: Transaction) -> SharedState:
    """In the caller's snapshot."""
    sql = tx.sql
    epoch = await tx.one(sql.epoch)
    holds = await tx.all(sql.hot_holds)
    requests = await tx.all(sql.hot_requests)
    revoked = await tx.all(codec.SELECT_REVOKED)
    runs = await tx.all(sql.hot_runs)
    acks = await tx.all(codec.SELECT_VIOLATION_ACKS)
    evidence = await tx.all(codec.SELECT_UNACKNOWLEDGED_EVIDENCE)
    return SharedState(
        epoch=0 if epoch is None else int(epoch["epoch"]),
        holds=[codec.hold_from_row(r) for r in holds],
        resume_requests=[codec.resume_from_row(r) for r in requests],
        revoked={r["serial"]: r["subject"] for r in revoked},
        runs=[codec.run_from_json(r["run"]) for r in runs],
        violation_acks={r["agent_id"]: r["violation_at"] for r in acks},
        violations=[codec.evidence_from_row(r) for r in evidence],
    )


async def load(tx: Transaction) -> LoadedState:
    shared = await read_shared(tx)
    return LoadedState(shared, [codec.agent_from_row(r) for r in await tx.all(tx.sql.agents)])


async def read_audit(
    tx: Transaction, after_seq: int, limit: int
) -> tuple[list[AuditEntry], ChainHead]:
    """In one snapshot: a head read after the page could be ahead of it."""
    rows = await tx.all(tx.sql.audit_page, (after_seq, limit))
    head = await tx.one(tx.sql.audit_head)
    assert head is not None, "the first migration inserts the audit_head row"
    return [codec.audit_from_row(r) for r in rows], ChainHead(head["seq"], head["hash"])
