"""The pure rules of two-person resume and of join tokens, without a server."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from control.domain import HoldKind
from control.domain import Scope
from control.domain.approvals import DEFAULT_REQUEST_TTL_SECONDS
from control.domain.approvals import Ask
from control.domain.approvals import ResumeState
from control.domain.approvals import approve
from control.domain.approvals import check_drill_approval
from control.domain.approvals import check_runbook_approval
from control.domain.approvals import deny
from control.domain.approvals import edit_request
from control.domain.approvals import executed
from control.domain.approvals import open_drill_request
from control.domain.approvals import open_request
from control.domain.approvals import supersedes
from control.domain.holds import Hold
from control.domain.identity import Principal
from control.domain.identity import Role
from control.domain.identity import check_enroll_token
from control.domain.identity import issue_enroll_token
from control.domain.identity import split_enroll_token
from control.errors import Conflict
from control.errors import InvalidInput
from control.errors import PermissionDenied

IC = Principal("ic-1", Role.INCIDENT_COMMANDER, serial="a1")
APPROVER = Principal("approver-1", Role.APPROVER, serial="b1")
IC_AS_APPROVER = Principal("ic-1", Role.APPROVER, serial="c1")
SRE = Principal("sre-1", Role.SRE, serial="d1")
HOLD = Hold(
    id="hold-1",
    kind=HoldKind.INCIDENT,
    scope=Scope.fleet(),
    reason="leak",
    ticket="INC-1",
    created_by="ic-1",
    created_at=0.0,
    created_epoch=1,
)


def test_a_request_names_its_hold_and_expires_after_an_hour_by_default() -> None:
    made = open_request(HOLD, Ask(IC, " contained ", "INC-1", now=100.0))
    assert (made.hold_id, made.requested_by, made.reason) == ("hold-1", "ic-1", "contained")
    assert made.expires_at == 100.0 + DEFAULT_REQUEST_TTL_SECONDS
    assert made.current_state(made.expires_at - 1) is ResumeState.PENDING
    assert made.current_state(made.expires_at) is ResumeState.EXPIRED


@pytest.mark.parametrize(
    ("hold", "expires_in", "error", "text"),
    [
        (dataclasses.replace(HOLD, lifted_at=5.0, lifted_epoch=2), 0.0, Conflict, "already"),
        (dataclasses.replace(HOLD, kind=HoldKind.OPT_OUT), 0.0, PermissionDenied, "owner"),
        (HOLD, -5.0, InvalidInput, "expiry"),
        (HOLD, 10 * 24 * 3600.0, InvalidInput, "expiry"),
    ],
)
def test_requests_that_cannot_be_opened(
    hold: Hold, expires_in: float, error: type[Exception], text: str
) -> None:
    with pytest.raises(error, match=text):
        open_request(hold, Ask(IC, "r", "", now=0.0, expires_in=expires_in))


def test_only_a_different_approver_decides() -> None:
    pending = open_request(HOLD, Ask(IC, "r", "", now=0.0))
    with pytest.raises(PermissionDenied, match="only an approver"):
        approve(pending, SRE, revision=1, note="", now=1.0)
    with pytest.raises(PermissionDenied, match="a different person must"):
        approve(pending, IC_AS_APPROVER, revision=1, note="", now=1.0)
    approved = approve(pending, APPROVER, revision=1, note=" ok ", now=1.0)
    assert approved.state is ResumeState.APPROVED
    assert [(a.approver, a.revision, a.note) for a in approved.approvals] == [
        ("approver-1", 1, "ok")
    ]
    with pytest.raises(Conflict, match="already approved"):
        approve(approved, APPROVER, revision=1, note="", now=2.0)
    assert executed(approved, 7).state is ResumeState.EXECUTED


def test_an_edit_drops_approvals_and_a_stale_review_is_refused() -> None:
    pending = open_request(HOLD, Ask(IC, "r", "", now=0.0))
    approved = approve(pending, APPROVER, revision=1, note="", now=1.0)
    with pytest.raises(PermissionDenied, match="only ic-1"):
        edit_request(approved, APPROVER, reason="mine now", ticket="", now=2.0)
    edited = edit_request(approved, IC, reason="wider", ticket="INC-2", now=2.0)
    assert (edited.state, edited.approvals, edited.revision) == (ResumeState.PENDING, (), 2)
    assert (edited.reason, edited.ticket) == ("wider", "INC-2")
    with pytest.raises(Conflict, match="changed since you reviewed it"):
        approve(edited, APPROVER, revision=1, note="", now=3.0)
    assert deny(edited, APPROVER, revision=2, note="no", now=3.0).state is ResumeState.DENIED


def test_a_request_only_moves_forward() -> None:
    """A snapshot read before a decision never takes the decision back (``adopt``)."""
    pending = open_request(HOLD, Ask(IC, "r", "", now=0.0))
    approved = approve(pending, APPROVER, revision=1, note="", now=1.0)
    done = executed(approved, 7)
    edited = edit_request(approved, IC, reason="wider", ticket="", now=2.0)
    history = [pending, approved, done]
    for older, newer in itertools.pairwise(history):
        assert supersedes(newer, older) and not supersedes(older, newer)
    assert supersedes(edited, approved) and not supersedes(approved, edited)
    assert supersedes(approved, approved)  # the same read again is adopted
    denied = deny(pending, APPROVER, revision=1, note="", now=1.0)
    assert not supersedes(pending, denied)


def test_closed_or_expired_requests_cannot_be_decided_or_edited() -> None:
    pending = open_request(HOLD, Ask(IC, "r", "", now=0.0, expires_in=10.0))
    with pytest.raises(Conflict, match="expired"):
        approve(pending, APPROVER, revision=1, note="", now=10.0)
    denied = deny(pending, APPROVER, revision=1, note="no", now=1.0)
    with pytest.raises(Conflict, match="denied"):
        edit_request(denied, IC, reason="again", ticket="", now=2.0)


def test_a_drill_approval_is_for_one_text_and_never_a_re_enable() -> None:
    automation = Principal("automation-1", Role.AUTOMATION, serial="e1")
    asked = open_drill_request(
        Ask(automation, "q4", "", now=0.0), runbook="drill", sha256="ab" * 32
    )
    assert (asked.hold_id, asked.for_drill, asked.for_runbook) == ("", True, True)
    with pytest.raises(Conflict, match="pending"):
        check_drill_approval(asked, runbook="drill", sha256="ab" * 32, now=1.0)
    approved = approve(asked, APPROVER, revision=1, note="", now=1.0)
    check_drill_approval(approved, runbook="drill", sha256="ab" * 32, now=2.0)
    with pytest.raises(PermissionDenied, match="file changed"):
        check_drill_approval(approved, runbook="drill", sha256="cd" * 32, now=2.0)
    with pytest.raises(PermissionDenied, match="not a re-enable"):
        check_runbook_approval(approved, hold_id="", now=2.0)
    resume = approve(
        open_request(HOLD, Ask(IC, "r", "", now=0.0), for_runbook=True),
        APPROVER,
        revision=1,
        note="",
        now=1.0,
    )
    with pytest.raises(PermissionDenied, match="not a drill"):
        check_drill_approval(resume, runbook="drill", sha256="ab" * 32, now=2.0)


def test_a_runbook_needs_a_runbook_approval_in_force_for_its_hold() -> None:
    asked = open_request(HOLD, Ask(IC, "r", "", now=0.0, expires_in=60.0), for_runbook=True)
    with pytest.raises(Conflict, match=f"resume request {asked.id} is pending; a runbook needs"):
        check_runbook_approval(asked, hold_id="hold-1", now=1.0)
    approved = approve(asked, APPROVER, revision=1, note="", now=1.0)
    check_runbook_approval(approved, hold_id="hold-1", now=2.0)
    with pytest.raises(Conflict, match="approves hold hold-1, not hold-2"):
        check_runbook_approval(approved, hold_id="hold-2", now=2.0)
    with pytest.raises(Conflict, match="is expired; a runbook needs"):
        check_runbook_approval(approved, hold_id="hold-1", now=60.0)


def test_join_tokens_are_checked_by_hash_expiry_and_uses() -> None:
    issued = issue_enroll_token(uses=2, ttl=60.0, created_by="ic-1", now=100.0)
    token_id, secret = split_enroll_token(issued.text)
    assert token_id == issued.token.id and secret not in issued.token.secret_sha256
    assert check_enroll_token(issued.token, secret, 100.0) == ""
    assert check_enroll_token(issued.token, secret + "x", 100.0) == "unknown enrolment token"
    assert check_enroll_token(None, secret, 100.0) == "unknown enrolment token"
    assert check_enroll_token(issued.token, secret, 160.0) == "enrolment token expired"
    spent = dataclasses.replace(issued.token, uses_left=0)
    assert check_enroll_token(spent, secret, 100.0) == "enrolment token has no uses left"


@pytest.mark.parametrize("text", ["", "kst_", "kst_abc", "xyz_abc.secret", "kst_.secret", "abc"])
def test_malformed_tokens_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="malformed enrolment token"):
        split_enroll_token(text)


@pytest.mark.parametrize(("uses", "ttl"), [(0, 60.0), (100_001, 60.0), (1, 0.0), (1, 1e9)])
def test_token_bounds(uses: int, ttl: float) -> None:
    with pytest.raises(InvalidInput):
        issue_enroll_token(uses=uses, ttl=ttl, created_by="ic-1", now=0.0)
