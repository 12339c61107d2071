"""Two-person resume: an incident commander asks, a *different* approver decides.

Pausing is the safe direction and needs one person; resuming re-enables capture
of keystrokes and screens, so it needs two. A request is tied to one hold and
one revision: editing it drops every approval given so far.

A drill request is the same two-person decision for starting a drill runbook (one
that pauses its scope first) without an incident commander: automation or an SRE
asks, an approver decides, and the approval is for that runbook's exact text.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from enum import StrEnum

from control.domain.holds import Hold
from control.domain.holds import HoldKind
from control.domain.holds import validate_reason
from control.domain.holds import validate_ticket
from control.domain.identity import Principal
from control.domain.identity import Role
from control.errors import Conflict
from control.errors import InvalidInput
from control.errors import PermissionDenied

DEFAULT_REQUEST_TTL_SECONDS = 3600.0
MAX_REQUEST_TTL_SECONDS = 7 * 24 * 3600.0


class ResumeState(StrEnum):
    """Where a resume request stands; only ``OPEN_STATES`` can still be decided, and an
    open request past its expiry reads as EXPIRED (``current_state``)."""

    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    EXECUTED = "executed"


OPEN_STATES = frozenset({ResumeState.PENDING, ResumeState.APPROVED})


@dataclass(frozen=True, slots=True)
class Approval:
    """One approver's yes, tied to the revision they read: an edit raises the revision,
    so an approval never covers words its approver did not see."""

    approver: str
    at: float
    revision: int
    note: str = ""


@dataclass(frozen=True, slots=True)
class ResumeRequest:
    """A request to lift a hold (or to start a drill): a record of its own, so who asked,
    who decided and on which revision stays on file after the hold is gone."""

    id: str
    hold_id: str
    requested_by: str
    reason: str
    ticket: str
    created_at: float
    expires_at: float
    for_runbook: bool = False
    state: ResumeState = ResumeState.PENDING
    revision: int = 1
    approvals: tuple[Approval, ...] = ()
    decided_by: str = ""
    decided_at: float | None = None
    decision_note: str = ""
    lifted_epoch: int = 0
    # A drill request has no hold: it approves starting this runbook, this exact text.
    drill_runbook: str = ""
    drill_sha256: str = ""

    @property
    def for_drill(self) -> bool:
        return bool(self.drill_sha256)

    def current_state(self, now: float) -> ResumeState:
        """Expiry is a function of time, so it is read here rather than stored by a timer."""
        if self.state in OPEN_STATES and now >= self.expires_at:
            return ResumeState.EXPIRED
        return self.state


# How far a request has got within one revision: a decision follows the ask, and a
# direct approval (or a run consuming the request) follows the decision.
_STAGE = {
    ResumeState.PENDING: 0,
    ResumeState.EXPIRED: 0,
    ResumeState.APPROVED: 1,
    ResumeState.DENIED: 1,
    ResumeState.EXECUTED: 2,
}


def supersedes(incoming: ResumeRequest, known: ResumeRequest) -> bool:
    """Whether ``incoming`` may replace ``known``: not older than it.

    A request only moves forward: an edit raises its revision, a decision or an
    execution moves it on within one. A replica re-reading the shared state may read a
    snapshot taken before a decision made here a moment ago; adopting that snapshot
    would take the decision back in memory (a runbook would be told the request it was
    just approved for is pending).
    """
    return (incoming.revision, _STAGE[incoming.state]) >= (known.revision, _STAGE[known.state])


def new_request_id() -> str:
    return f"resume-{secrets.token_hex(5)}"


@dataclass(frozen=True, slots=True)
class Ask:
    """What every request states, whatever it is for: who asks, why, under which ticket,
    when, and how long it may wait for a decision (0: the default). One value, so a
    resume request and a drill request are opened from the same words, checked the
    same way (``_opened``)."""

    requester: Principal
    reason: str
    ticket: str
    now: float
    expires_in: float = 0.0


def open_request(hold: Hold, ask: Ask, *, for_runbook: bool = False) -> ResumeRequest:
    if not hold.active:
        raise Conflict(f"hold {hold.id!r} was already lifted at epoch {hold.lifted_epoch}")
    if hold.kind is HoldKind.OPT_OUT:
        raise PermissionDenied(
            f"hold {hold.id!r} is an employee opt-out: only the laptop's owner can lift it"
        )
    return _opened(ask, hold_id=hold.id, for_runbook=for_runbook)


def open_drill_request(ask: Ask, *, runbook: str, sha256: str) -> ResumeRequest:
    """Asks to start a drill runbook; whoever asks may not decide (``_check_decider``)."""
    return _opened(ask, for_runbook=True, drill_runbook=runbook, drill_sha256=sha256)


def _opened(
    ask: Ask,
    *,
    for_runbook: bool,
    hold_id: str = "",
    drill_runbook: str = "",
    drill_sha256: str = "",
) -> ResumeRequest:
    """A new pending request: the asker's words validated and its expiry set here alone,
    so a drill request cannot be opened on looser terms than a resume request."""
    return ResumeRequest(
        id=new_request_id(),
        hold_id=hold_id,
        requested_by=ask.requester.name,
        reason=validate_reason(ask.reason),
        ticket=validate_ticket(ask.ticket),
        created_at=ask.now,
        expires_at=ask.now + _ttl(ask.expires_in),
        for_runbook=for_runbook,
        drill_runbook=drill_runbook,
        drill_sha256=drill_sha256,
    )


def _ttl(expires_in: float) -> float:
    ttl = expires_in or DEFAULT_REQUEST_TTL_SECONDS
    if not 0 < ttl <= MAX_REQUEST_TTL_SECONDS:
        raise InvalidInput(
            f"expiry must be more than 0 and at most {MAX_REQUEST_TTL_SECONDS:.0f} seconds"
        )
    return ttl


def _require_open(request: ResumeRequest, now: float) -> None:
    state = request.current_state(now)
    if state not in OPEN_STATES:
        raise Conflict(f"resume request {request.id!r} is {state.value}; open a new one")


def edit_request(
    request: ResumeRequest, editor: Principal, *, reason: str, ticket: str, now: float
) -> ResumeRequest:
    """Only the requester edits; whatever was approved before is no longer what is asked."""
    _require_open(request, now)
    if editor.name != request.requested_by:
        raise PermissionDenied(f"only {request.requested_by} can edit resume request {request.id}")
    return dataclasses.replace(
        request,
        reason=validate_reason(reason) if reason else request.reason,
        ticket=validate_ticket(ticket) if ticket else request.ticket,
        revision=request.revision + 1,
        approvals=(),
        state=ResumeState.PENDING,
    )


def _check_decider(request: ResumeRequest, decider: Principal, revision: int, now: float) -> None:
    _require_open(request, now)
    if decider.role is not Role.APPROVER:
        raise PermissionDenied("only an approver can decide a resume request")
    if decider.name == request.requested_by:
        raise PermissionDenied(
            f"{decider.name} asked for this resume and cannot decide it: a different person must"
        )
    if request.state is not ResumeState.PENDING:
        raise Conflict(f"resume request {request.id!r} is already approved")
    if revision and revision != request.revision:
        raise Conflict(
            f"resume request {request.id!r} changed since you reviewed it"
            f" (revision {revision}, now {request.revision}); review it again"
        )


def approve(
    request: ResumeRequest, approver: Principal, *, revision: int, note: str, now: float
) -> ResumeRequest:
    """A direct resume is EXECUTED by the caller in the same transaction as the lift."""
    _check_decider(request, approver, revision, now)
    approval = Approval(approver.name, now, request.revision, note.strip())
    return dataclasses.replace(
        request,
        approvals=(*request.approvals, approval),
        state=ResumeState.APPROVED,
        decided_by=approver.name,
        decided_at=now,
        decision_note=note.strip(),
    )


def deny(
    request: ResumeRequest, approver: Principal, *, revision: int, note: str, now: float
) -> ResumeRequest:
    _check_decider(request, approver, revision, now)
    return dataclasses.replace(
        request,
        state=ResumeState.DENIED,
        decided_by=approver.name,
        decided_at=now,
        decision_note=note.strip(),
    )


def executed(request: ResumeRequest, lifted_epoch: int) -> ResumeRequest:
    return dataclasses.replace(request, state=ResumeState.EXECUTED, lifted_epoch=lifted_epoch)


def _require_approved(request: ResumeRequest, now: float, *, asked: str, by: str) -> None:
    """Only an approval in force counts: pending, denied, expired or executed is refused."""
    state = request.current_state(now)
    if state is not ResumeState.APPROVED:
        raise Conflict(f"{asked} {request.id} is {state.value}; {by} needs an approved one")


def check_runbook_approval(request: ResumeRequest, *, hold_id: str, now: float) -> None:
    """A runbook re-enables only with an approval given *for a runbook*, on that hold."""
    if request.for_drill:
        raise PermissionDenied(
            f"resume request {request.id} approves starting drill {request.drill_runbook!r},"
            " not a re-enable"
        )
    if not request.for_runbook:
        raise PermissionDenied(
            f"resume request {request.id} is a direct resume, not one for a runbook;"
            " open one with `killswitch resume --for-runbook`"
        )
    _require_approved(request, now, asked="resume request", by="a runbook")
    if hold_id and request.hold_id != hold_id:
        raise Conflict(
            f"resume request {request.id} approves hold {request.hold_id}, not {hold_id}"
        )


def check_drill_approval(request: ResumeRequest, *, runbook: str, sha256: str, now: float) -> None:
    """A drill starts without an incident commander only with an approval of its exact text."""
    if not request.for_drill:
        raise PermissionDenied(
            f"resume request {request.id} approves a re-enable of hold {request.hold_id},"
            " not a drill; ask with `killswitch runbook request FILE`"
        )
    _require_approved(request, now, asked="drill request", by="a drill")
    if request.drill_sha256 != sha256:
        raise PermissionDenied(
            f"drill request {request.id} approves another text of {request.drill_runbook!r}"
            f" than this {runbook!r}: the file changed since it was approved; ask again"
        )
