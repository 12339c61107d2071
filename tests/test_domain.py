"""Unit tests of the pure core: scopes, effective desired state, compliance rules."""

from __future__ import annotations

import pytest

from control.domain import (
    AgentStatus,
    ComplianceState,
    Desired,
    Hold,
    HoldKind,
    Mode,
    Scope,
    evaluate,
    fleet_compliant,
    parse_selector,
    reconcile_desired,
    validate_reason,
)
from control.errors import InvalidInput

LABELS = {"region": "eu-west", "org": "infra", "os": "macos"}
DEADLINE = 30.0


def hold(hold_id: str, scope: Scope, epoch: int, *, lifted_epoch: int = 0) -> Hold:
    return Hold(
        id=hold_id,
        kind=HoldKind.INCIDENT,
        scope=scope,
        reason=f"reason {hold_id}",
        ticket="",
        created_by="ic",
        created_at=0.0,
        created_epoch=epoch,
        lifted_at=1.0 if lifted_epoch else None,
        lifted_epoch=lifted_epoch,
    )


# ------------------------------------------------------------------ scopes


def test_scopes_cover_the_right_agents() -> None:
    assert Scope.fleet().covers("a", {})
    assert Scope.selector({"region": "eu-west"}).covers("a", LABELS)
    assert not Scope.selector({"region": "eu-west", "org": "sales"}).covers("a", LABELS)
    assert not Scope.selector({"team": "x"}).covers("a", LABELS)
    assert Scope.agents(["a", "b"]).covers("b", {})
    assert not Scope.agents(["a"]).covers("c", LABELS)


def test_parse_selector() -> None:
    assert parse_selector("region=eu-west, org=infra") == {"region": "eu-west", "org": "infra"}
    assert parse_selector("region=eu,region=eu") == {"region": "eu"}
    for bad in ["", "region", "=eu", "region=", "region=eu,region=us", "reg ion=eu", "a=b c"]:
        with pytest.raises(InvalidInput):
            parse_selector(bad)


def test_empty_scopes_and_reasons_are_rejected() -> None:
    with pytest.raises(InvalidInput):
        Scope.selector({})
    with pytest.raises(InvalidInput):
        Scope.agents([])
    with pytest.raises(InvalidInput):
        validate_reason(" \n\t ")
    assert validate_reason("  data   leak ") == "data leak"


# ------------------------------------------------------------------ effective state


def test_paused_while_any_active_hold_covers_the_agent() -> None:
    h1 = hold("h1", Scope.fleet(), 1)
    h2 = hold("h2", Scope.selector({"org": "infra"}), 2)
    d = reconcile_desired(None, "a", LABELS, [h1, h2], epoch=2, now=10.0)
    assert (d.mode, d.hold_ids, d.epoch) == (Mode.PAUSED, ("h1", "h2"), 2)
    assert "+1 more holds" in d.reason

    lifted_h1 = hold("h1", Scope.fleet(), 1, lifted_epoch=3)
    d2 = reconcile_desired(d, "a", LABELS, [lifted_h1, h2], epoch=3, now=11.0)
    assert (d2.mode, d2.hold_ids, d2.epoch) == (Mode.PAUSED, ("h2",), 3)

    d3 = reconcile_desired(d2, "a", LABELS, [lifted_h1], epoch=4, now=12.0)
    assert (d3.mode, d3.hold_ids, d3.epoch, d3.since) == (Mode.ALLOWED, (), 4, 12.0)


def test_unrelated_changes_keep_the_desired_epoch() -> None:
    """A hold elsewhere in the fleet must not force this agent to re-ack."""
    d = reconcile_desired(None, "a", LABELS, [], epoch=1, now=0.0)
    other = hold("h", Scope.selector({"region": "us-east"}), 2)
    assert reconcile_desired(d, "a", LABELS, [other], epoch=2, now=5.0) is d


# ------------------------------------------------------------------ compliance


def paused(epoch: int = 5, since: float = 100.0) -> Desired:
    return Desired(Mode.PAUSED, ("h",), "r", epoch, since)


def connected(**kw: object) -> AgentStatus:
    status = AgentStatus()
    status.record_connect(1.0)
    for key, value in kw.items():
        setattr(status, key, value)
    return status


STOPPED = {"keyboard": False, "mouse": False, "screen": False}


def state(desired: Desired, status: AgentStatus, now: float = 110.0) -> ComplianceState:
    return evaluate(desired, status, now=now, ack_deadline=DEADLINE).state


def test_pending_then_overdue_without_an_ack() -> None:
    assert state(paused(), connected()) is ComplianceState.PENDING
    verdict = evaluate(paused(), connected(), now=131.0, ack_deadline=DEADLINE)
    assert verdict.state is ComplianceState.OVERDUE
    assert verdict.since == 130.0


def test_deadline_counts_from_connect_for_late_joiners() -> None:
    late = connected(connected_at=200.0)
    assert state(paused(since=100.0), late, now=220.0) is ComplianceState.PENDING


def test_stop_reported_only_for_an_ack_of_the_current_epoch_or_newer() -> None:
    status = connected()
    status.record_ack(5, Mode.PAUSED, STOPPED, at=105.0)
    verdict = evaluate(paused(), status, now=110.0, ack_deadline=DEADLINE)
    assert (verdict.state, verdict.since) == (ComplianceState.STOP_REPORTED, 105.0)
    assert state(paused(epoch=6), status) is ComplianceState.PENDING


def test_a_replayed_old_ack_never_counts_for_a_newer_epoch() -> None:
    status = connected()
    status.record_ack(7, Mode.ALLOWED, {"keyboard": True}, at=105.0)
    assert not status.record_ack(5, Mode.PAUSED, STOPPED, at=106.0)
    assert state(paused(epoch=8), status) is ComplianceState.PENDING
    assert status.acked_epoch == 7


def test_nack_is_failed_with_its_reason() -> None:
    status = connected()
    status.record_nack(5, "screen driver stuck", at=103.0)
    verdict = evaluate(paused(), status, now=110.0, ack_deadline=DEADLINE)
    assert verdict.state is ComplianceState.FAILED
    assert "screen driver stuck" in verdict.reason
    # An older nack does not fail a newer epoch.
    assert state(paused(epoch=6), status) is ComplianceState.PENDING


def test_ack_after_nack_of_same_epoch_wins() -> None:
    status = connected()
    status.record_nack(5, "retrying", at=101.0)
    status.record_ack(5, Mode.PAUSED, STOPPED, at=102.0)
    assert state(paused(), status) is ComplianceState.STOP_REPORTED


def test_active_channel_or_allowed_ack_while_paused_is_a_violation() -> None:
    status = connected()
    status.record_ack(5, Mode.PAUSED, {**STOPPED, "screen": True}, at=105.0)
    verdict = evaluate(paused(), status, now=110.0, ack_deadline=DEADLINE)
    assert verdict.state is ComplianceState.VIOLATION and "screen" in verdict.reason

    liar = connected()
    liar.record_ack(5, Mode.ALLOWED, {"keyboard": True}, at=105.0)
    assert state(paused(), liar) is ComplianceState.VIOLATION

    status.record_ack(5, Mode.PAUSED, STOPPED, at=106.0)
    status.record_heartbeat({**STOPPED, "keyboard": True}, at=107.0)
    assert state(paused(), status) is ComplianceState.VIOLATION


def test_offline_and_never_seen() -> None:
    gone = AgentStatus(first_seen=1.0, last_seen=50.0, connected=False, disconnected_at=50.0)
    verdict = evaluate(paused(), gone, now=110.0, ack_deadline=DEADLINE)
    assert (verdict.state, verdict.since) == (ComplianceState.OFFLINE_AT_RISK, 50.0)
    allowed = Desired(Mode.ALLOWED, (), "", 5, 0.0)
    assert state(allowed, gone) is ComplianceState.OFFLINE
    assert state(paused(), AgentStatus(expected_since=3.0)) is ComplianceState.NEVER_SEEN


def test_allowed_direction_states() -> None:
    allowed = Desired(Mode.ALLOWED, (), "", 5, 100.0)
    status = connected()
    assert state(allowed, status) is ComplianceState.RESUME_PENDING
    status.record_ack(5, Mode.ALLOWED, {"keyboard": True}, at=101.0)
    assert state(allowed, status) is ComplianceState.CAPTURING


def test_fleet_compliance() -> None:
    s = ComplianceState
    assert fleet_compliant([(Mode.PAUSED, s.STOP_REPORTED), (Mode.ALLOWED, s.RESUME_PENDING)])
    assert not fleet_compliant([(Mode.PAUSED, s.STOP_REPORTED), (Mode.PAUSED, s.OVERDUE)])
    assert not fleet_compliant([(Mode.ALLOWED, s.VIOLATION)])
    assert not fleet_compliant([(Mode.PAUSED, s.OFFLINE_AT_RISK)])
    assert fleet_compliant([])


def test_acks_from_before_a_reconnect_prove_nothing_until_the_agent_acks_again() -> None:
    status = connected()
    status.record_ack(5, Mode.PAUSED, STOPPED, at=105.0)
    status.record_disconnect(106.0)
    assert state(paused(), status) is ComplianceState.OFFLINE_AT_RISK
    status.record_connect(107.0)
    assert state(paused(), status) is ComplianceState.PENDING
    status.record_ack(5, Mode.PAUSED, STOPPED, at=108.0)
    assert state(paused(), status) is ComplianceState.STOP_REPORTED

    status.record_nack(6, "stuck", at=109.0)
    status.record_connect(110.0)
    assert state(paused(epoch=6), status) is ComplianceState.PENDING
