"""The checks a transaction script makes on rows it has just read, before it writes.

Apart from the row codec (``codec``): these decide whether a write may happen (a hold
still active, a run at the expected version, a resume request still open at the
approved revision) and say why not in the caller's terms. Written once for every store:
both run the same scripts (``scripts``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import structlog

from control.domain import Hold
from control.domain.approvals import OPEN_STATES
from control.domain.approvals import ResumeRequest
from control.domain.approvals import ResumeState
from control.domain.audit import AuditEntry
from control.domain.audit import AuditRecord
from control.domain.audit import ChainHead
from control.domain.audit import chain
from control.domain.identity import CertificateRecord
from control.domain.rollout import Run
from control.errors import Conflict
from control.errors import NotFound
from control.errors import shown
from control.store.codec import Row
from control.store.codec import certificate_from_row
from control.store.codec import hold_from_row
from control.store.codec import resume_from_row
from control.store.codec import run_from_json

log = structlog.get_logger("killswitch.store")


def still_active(hold_id: str) -> Conflict:
    return Conflict(f"hold {hold_id!r} is already active")


def already_exists(what: str) -> Conflict:
    """A reused key is the caller's conflict, not a crash."""
    return Conflict(f"{what} already exists")


def active_hold(row: Row | None, hold_id: str) -> Hold:
    """The hold a lift or release applies to: it must exist and still be active."""
    if row is None:
        raise NotFound(f"unknown hold {hold_id!r}")
    hold = hold_from_row(row)
    if not hold.active:
        raise Conflict(f"hold {hold_id!r} was already lifted at epoch {hold.lifted_epoch}")
    return hold


def lifted(hold: Hold, lifted_by: str, lifted_at: float, epoch: int) -> Hold:
    return dataclasses.replace(hold, lifted_at=lifted_at, lifted_by=lifted_by, lifted_epoch=epoch)


def to_revoke(subject_or_serial: str, rows: Sequence[Row]) -> list[CertificateRecord]:
    """The unrevoked certificates among those matching, or why there is nothing to revoke."""
    if not rows:
        raise NotFound(f"no certificate with subject or serial {shown(subject_or_serial)}")
    unrevoked = [c for c in map(certificate_from_row, rows) if not c.revoked]
    if not unrevoked:
        raise Conflict(f"every certificate matching {subject_or_serial!r} is already revoked")
    return unrevoked


def check_run_version(stored: str | None, run: Run) -> None:
    """The compare-and-set of a run step: ``run`` must be the next version of the stored
    run (its JSON; ``None`` when there is none, which counts as version 0)."""
    stored_version = 0 if stored is None else run_from_json(stored).version
    if stored_version != run.version - 1:
        raise Conflict(
            f"run {run.id} was changed by another writer: stored version {stored_version},"
            f" this step expects {run.version - 1}"
        )


def check_request_write(stored: Row | None, request: ResumeRequest) -> None:
    """The compare-and-set of a resume request write, so that two replicas deciding at
    once cannot both win.

    Allowed over a stored request that is still open: an edit (the next revision) or a
    decision on a PENDING one (the same revision, no longer PENDING). A new request
    has nothing stored.
    """
    if stored is None:
        return
    current = resume_from_row(stored)
    if current.state not in OPEN_STATES:
        raise Conflict(f"resume request {current.id!r} is {current.state.value}")
    edit = request.revision == current.revision + 1
    decision = (
        request.revision == current.revision
        and current.state is ResumeState.PENDING
        and request.state is not ResumeState.PENDING
    )
    if not (edit or decision):
        raise Conflict(
            f"resume request {current.id!r} changed meanwhile (now revision"
            f" {current.revision}, {current.state.value}); review it again"
        )


def check_request_executable(stored: Row | None, request: ResumeRequest) -> None:
    """A request executed (a direct resume, or consumed by a run) must still be open and
    at the revision that was approved."""
    if stored is None:
        return
    current = resume_from_row(stored)
    if current.state not in OPEN_STATES:
        raise Conflict(f"resume request {current.id!r} is {current.state.value}")
    if current.revision != request.revision:
        raise Conflict(
            f"resume request {current.id!r} changed since it was approved (revision"
            f" {request.revision}, now {current.revision}); review it again"
        )


def chain_after(head: ChainHead, records: Sequence[AuditRecord]) -> list[AuditEntry]:
    """``records`` chained after the stored head, in order."""
    previous: AuditEntry | ChainHead = head
    entries: list[AuditEntry] = []
    for record in records:
        previous = chain(previous, record)
        entries.append(previous)
    return entries


def log_appended(entries: Sequence[AuditEntry]) -> None:
    """After commit only: each entry's hash, off the database, is an anchor that a
    consistently cut log and head cannot match."""
    for entry in entries:
        log.info(
            "audit_appended",
            seq=entry.seq,
            hash=entry.hash,
            action=entry.record.action,
            actor=entry.record.actor,
        )
