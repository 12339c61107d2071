"""Unit tests of the pure core: scopes, effective desired state, compliance rules."""

from __future__ import annotations

import dataclasses

import pytest

from control.domain import AgentStatus
from control.domain import CaptureReport
from control.domain import Compliance
from control.domain import CompliancePolicy
from control.domain import ComplianceState
from control.domain import Desired
from control.domain import Hold
from control.domain import HoldKind
from control.domain import Mode
from control.domain import Scope
from control.domain import evaluate
from control.domain import fleet_compliant
from control.domain import parse_selector
from control.domain import reconcile_desired
from control.domain import validate_reason
from control.domain.compliance import UPLOAD_IN_FLIGHT_GRACE_SECONDS
from control.errors import InvalidInput

LABELS = {"region": "eu-west", "org": "infra", "os": "macos"}
POLICY = CompliancePolicy(ack_deadline=30.0, heartbeat_interval=10.0)


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

STOPPED = {"keyboard": False, "mouse": False, "screen": False}
NOW = 110.0


def paused(epoch: int = 5, since: float = 100.0) -> Desired:
    return Desired(Mode.PAUSED, ("h",), "r", epoch, since)


def allowed(epoch: int = 5, since: float = 100.0) -> Desired:
    return Desired(Mode.ALLOWED, (), "no active hold", epoch, since)


def connected(at: float = 99.0) -> AgentStatus:
    status = AgentStatus()
    status.record_connect(at)
    return status


def report(events: int, spool: int = 0, last: float | None = 100.0) -> CaptureReport:
    return CaptureReport(events_total=events, last_event_at=last, spool_events=spool)


def ack_pause(status: AgentStatus, desired: Desired, at: float = 105.0, events: int = 40) -> None:
    status.record_ack(desired.epoch, Mode.PAUSED, STOPPED, report(events), at, desired=desired)


def beat(
    status: AgentStatus, desired: Desired, at: float, events: int = 40, **channels: bool
) -> None:
    status.record_heartbeat(
        {**STOPPED, **channels}, report(events), at, desired=desired, verify_after=10.0
    )


def verdict(desired: Desired, status: AgentStatus, now: float = NOW) -> tuple[ComplianceState, str]:
    result = evaluate(desired, status, now=now, policy=POLICY)
    return result.state, result.reason


def state(desired: Desired, status: AgentStatus, now: float = NOW) -> ComplianceState:
    return verdict(desired, status, now)[0]


def test_pending_then_overdue_without_an_ack() -> None:
    status = connected()
    assert state(paused(), status) is ComplianceState.PENDING
    status.last_seen = 130.0
    result = evaluate(paused(), status, now=131.0, policy=POLICY)
    assert (result.state, result.since) == (ComplianceState.OVERDUE, 130.0)


def test_deadline_counts_from_connect_for_late_joiners() -> None:
    assert state(paused(since=100.0), connected(at=200.0), now=220.0) is ComplianceState.PENDING


def test_stop_is_reported_then_verified_by_a_frozen_heartbeat_an_interval_later() -> None:
    desired, status = paused(), connected()
    ack_pause(status, desired, at=105.0)
    assert state(desired, status) is ComplianceState.STOP_REPORTED
    beat(status, desired, at=110.0)  # too soon after the ack to prove anything
    assert state(desired, status, now=111.0) is ComplianceState.STOP_REPORTED
    beat(status, desired, at=115.5)
    assert state(desired, status, now=116.0) is ComplianceState.VERIFIED_STOPPED
    assert state(paused(epoch=6), status, now=116.0) is ComplianceState.PENDING


def test_a_frozen_report_one_proof_window_after_the_ack_verifies_and_checking_goes_on() -> None:
    """Verification in seconds: the default window is a few capture ticks, not a
    heartbeat interval. A report inside it proves nothing; one at its end verifies; a
    later report whose counters rose is a violation all the same."""
    window = CompliancePolicy().verify_after
    assert window < CompliancePolicy().heartbeat_interval
    desired, status = paused(), connected()
    ack_pause(status, desired, at=105.0)

    def report_at(at: float, events: int = 40) -> None:
        status.record_heartbeat(STOPPED, report(events), at, desired=desired, verify_after=window)

    report_at(105.0 + window - 0.1)
    assert state(desired, status, now=109.0) is ComplianceState.STOP_REPORTED
    report_at(105.0 + window)
    assert state(desired, status, now=109.0) is ComplianceState.VERIFIED_STOPPED
    report_at(125.0, events=41)
    assert state(desired, status, now=126.0) is ComplianceState.VIOLATION


@pytest.mark.parametrize(
    ("since_ack", "verified"),
    [
        (2.2, True),  # the agent counted the window; the server has seen 6 s since sending
        (1.5, False),  # not a window on either clock
        (6.5, False),  # more than the server could have seen since it sent the directive
    ],
)
def test_a_stop_acked_on_a_busy_server_is_verified_on_the_agents_count_within_the_servers(
    since_ack: float, verified: bool
) -> None:
    """A fleet-wide pause: the server sent the directive at 100 and processed the ack
    only at 105 (behind thousands of others); the report, 2.2 s after the ack by the
    agent's clock, arrives at 106, 1 s after the server's record of the ack. It verifies
    on the agent's count, but never on a count longer than the 6 s the server has seen
    since it sent the directive: so even a lying agent waits a window of real time."""
    window = CompliancePolicy().verify_after
    desired, status = paused(), connected()
    status.directive_sent_at, status.directive_sent_epoch = 100.0, desired.epoch
    ack_pause(status, desired, at=105.0)
    status.record_heartbeat(
        STOPPED, report(40), 106.0, desired=desired, verify_after=window, since_ack=since_ack
    )
    expected = ComplianceState.VERIFIED_STOPPED if verified else ComplianceState.STOP_REPORTED
    assert state(desired, status, now=106.0) is expected
    status.record_heartbeat(
        STOPPED, report(41), 107.0, desired=desired, verify_after=window, since_ack=3.2
    )
    assert state(desired, status, now=107.0) is ComplianceState.VIOLATION, "checking goes on"


def test_a_server_that_asks_for_faster_beats_verifies_no_later_than_one_of_them() -> None:
    """The proof window never slows verification down: with beats every second, one beat
    interval after the ack is proof enough, as it was before the window existed."""
    assert CompliancePolicy(heartbeat_interval=1.0).verify_after == 1.0
    default = CompliancePolicy()
    assert default.verify_after == default.proof_window < default.heartbeat_interval


def test_evidence_after_a_stop_ack_is_a_sticky_violation() -> None:
    for events, screen in [(41, False), (40, True)]:
        desired, status = paused(), connected()
        ack_pause(status, desired)
        beat(status, desired, at=116.0, events=events, screen=screen)
        found, reason = verdict(desired, status, now=117.0)
        assert found is ComplianceState.VIOLATION, (events, screen)
        beat(status, desired, at=127.0, events=events)
        assert state(desired, status, now=128.0) is ComplianceState.VIOLATION, "never self-clears"
        assert state(allowed(epoch=7), status, now=128.0) is ComplianceState.VIOLATION
        assert status.acknowledge_violation() == reason
        assert state(desired, status, now=128.0) is not ComplianceState.VIOLATION


def test_spool_growth_and_allowed_ack_while_paused_are_violations() -> None:
    desired, status = paused(), connected()
    ack_pause(status, desired)
    status.record_heartbeat(STOPPED, report(40, spool=3), 116.0, desired=desired, verify_after=10.0)
    assert "spool grew" in verdict(desired, status)[1]

    liar = connected()
    liar.record_ack(5, Mode.ALLOWED, {"keyboard": True}, report(1), 105.0, desired=paused())
    assert state(paused(), liar) is ComplianceState.VIOLATION


def test_activity_before_the_ack_is_not_a_violation() -> None:
    desired, status = paused(), connected()
    beat(status, desired, at=104.0, events=99, screen=True)
    assert state(desired, status) is ComplianceState.PENDING


def test_a_replayed_old_ack_never_counts_for_a_newer_epoch() -> None:
    status = connected()
    status.record_ack(7, Mode.ALLOWED, {"keyboard": True}, report(1), 105.0, desired=allowed(7))
    assert not status.record_ack(5, Mode.PAUSED, STOPPED, report(1), 106.0, desired=paused(8))
    assert state(paused(epoch=8), status) is ComplianceState.PENDING
    assert status.acked_epoch == 7


def test_nack_is_failed_with_its_reason_and_ack_after_nack_wins() -> None:
    desired, status = paused(), connected()
    status.record_nack(5, "screen driver stuck", at=103.0)
    state_, reason = verdict(desired, status)
    assert state_ is ComplianceState.FAILED and "screen driver stuck" in reason
    assert state(paused(epoch=6), status) is ComplianceState.PENDING
    ack_pause(status, desired, at=104.0)
    assert state(desired, status) is ComplianceState.STOP_REPORTED


def test_acks_from_before_a_reconnect_prove_nothing_until_the_agent_acks_again() -> None:
    desired, status = paused(), connected()
    ack_pause(status, desired)
    status.record_disconnect(106.0)
    status.record_connect(107.0)
    assert state(desired, status) is ComplianceState.PENDING
    ack_pause(status, desired, at=108.0)
    assert state(desired, status) is ComplianceState.STOP_REPORTED


def test_offline_paused_agent_is_at_risk_until_its_lease_expires() -> None:
    status = connected()
    status.record_lease(expires_at=130.0)
    status.record_disconnect(106.0)
    assert state(paused(), status, now=120.0) is ComplianceState.OFFLINE_AT_RISK
    result = evaluate(paused(), status, now=131.0, policy=POLICY)
    assert (result.state, result.since) == (ComplianceState.OFFLINE_LEASE_EXPIRED, 130.0)
    assert state(allowed(), status, now=120.0) is ComplianceState.OFFLINE


def test_a_silent_stream_is_not_shown_as_connected_and_healthy() -> None:
    desired, status = paused(), connected()
    ack_pause(status, desired)
    beat(status, desired, at=116.0)
    assert state(desired, status, now=140.0) is ComplianceState.VERIFIED_STOPPED
    state_, reason = verdict(desired, status, now=150.0)
    assert state_ is ComplianceState.OFFLINE_LEASE_EXPIRED and "silent" in reason


def test_never_seen() -> None:
    assert state(paused(), AgentStatus(expected_since=3.0)) is ComplianceState.NEVER_SEEN


def test_allowed_direction_states() -> None:
    status = connected()
    assert state(allowed(), status) is ComplianceState.RESUME_PENDING
    status.record_ack(5, Mode.ALLOWED, {"keyboard": True}, report(1), 101.0, desired=allowed())
    assert state(allowed(), status) is ComplianceState.RESUME_PENDING, "no lease yet"
    status.record_lease(expires_at=NOW + 5)
    assert state(allowed(), status) is ComplianceState.CAPTURING
    # A lease that ran out (the server could not renew it) means not capturing.
    expired = verdict(allowed(), status, NOW + 6)
    assert expired[0] is ComplianceState.RESUME_PENDING and "lease expired" in expired[1]


def test_uploads_are_authorized_only_with_a_lease_and_never_while_paused() -> None:
    status = connected()
    assert not status.decide_upload(100.0, 101.0, 5, 102.0, desired=allowed()).allowed
    status.record_lease(expires_at=160.0)
    assert status.decide_upload(100.0, 101.0, 5, 102.0, desired=allowed()).allowed
    assert not status.decide_upload(100.0, 160.5, 5, 161.0, desired=allowed()).allowed
    decision = status.decide_upload(100.0, 101.0, 5, 103.0, desired=paused())
    assert not decision.allowed and "paused" in decision.reason
    assert status.uploads_refused == 3
    assert not status.violation, "refusing an unacked agent's upload is not a violation"


def test_an_upload_dated_after_the_stop_ack_is_a_violation() -> None:
    desired, status = paused(), connected()
    ack_pause(status, desired, at=105.0)
    status.decide_upload(90.0, 106.0, 5, 110.0, desired=desired)  # within clock skew
    assert not status.violation
    status.decide_upload(90.0, 109.0, 5, 110.0, desired=desired)
    assert state(desired, status) is ComplianceState.VIOLATION
    assert "upload of 5 events" in status.violation


def test_an_upload_long_after_the_stop_ack_is_a_violation_whatever_its_events_dates() -> None:
    """A liar with a backlog ships only events from before its stop: the upload is the
    evidence, once no batch started before the ack can still be in flight."""
    desired, status = paused(), connected()
    ack_pause(status, desired, at=105.0)
    in_flight = status.decide_upload(90.0, 100.0, 500, 106.0, desired=desired)
    assert not in_flight.allowed and not status.violation, "started before the ack"
    late = 105.0 + UPLOAD_IN_FLIGHT_GRACE_SECONDS + 1
    decision = status.decide_upload(90.0, 100.0, 500, late, desired=desired)
    assert not decision.allowed
    assert evaluate(desired, status, now=late, policy=POLICY) == Compliance(
        ComplianceState.VIOLATION,
        "uploaded a batch of 500 events 16 s after acking its pause:"
        " a stopped agent uploads nothing",
        late,
    )


def test_a_late_upload_flags_no_agent_that_has_not_acked_or_was_resumed() -> None:
    late = 105.0 + UPLOAD_IN_FLIGHT_GRACE_SECONDS + 1
    unacked = connected()
    assert not unacked.decide_upload(90.0, 100.0, 5, late, desired=paused()).allowed
    assert not unacked.violation, "refused: it may not have heard of the pause yet"

    resumed = connected()
    ack_pause(resumed, paused(), at=105.0)
    assert not resumed.decide_upload(90.0, 100.0, 5, late, desired=allowed(epoch=6)).allowed
    assert not resumed.violation, "allowed again (a lease will follow): no stop claimed"


def second_hold(epoch: int = 6, since: float = 120.0) -> Desired:
    """Still paused, now also by a second covering hold: a new epoch to ack."""
    return Desired(Mode.PAUSED, ("h", "h2"), "r (+1 more holds)", epoch, since)


def test_a_second_pause_ack_is_compared_with_the_first_ones_counters() -> None:
    first, second = paused(), second_hold()
    status = connected()
    ack_pause(status, first, at=105.0, events=40)
    # Captured 10 more events, then acked the second hold with the moved counter.
    ack_pause(status, second, at=121.0, events=50)
    assert state(second, status, now=122.0) is ComplianceState.VIOLATION
    assert "rose from 40 to 50" in status.violation
    # A reconnect (a new stream) is no new baseline either.
    honest = connected()
    ack_pause(honest, first, at=105.0, events=40)
    honest.record_connect(115.0)
    ack_pause(honest, second, at=121.0, events=40)
    beat(honest, second, at=131.5, events=40)
    assert state(second, honest, now=132.0) is ComplianceState.VERIFIED_STOPPED


def test_a_second_pause_ack_keeps_the_stop_time_the_upload_check_uses() -> None:
    first, second = paused(), second_hold()
    status = connected()
    ack_pause(status, first, at=105.0)
    ack_pause(status, second, at=130.0)
    # Events dated between the two acks: captured after the first stop.
    status.decide_upload(100.0, 118.0, 5, 131.0, desired=second)
    assert state(second, status, now=131.0) is ComplianceState.VIOLATION
    assert status.stopped_at == 105.0


def baseline(status: AgentStatus) -> tuple[float | None, int]:
    return status.stopped_at, status.ack_report.events_total


def test_the_baseline_starts_again_once_the_agent_is_allowed() -> None:
    for allow in ("ack", "lease"):
        status = connected()
        ack_pause(status, paused(), at=105.0, events=40)
        if allow == "ack":
            status.record_ack(
                6, Mode.ALLOWED, {"screen": True}, report(40), 120.0, desired=allowed(epoch=6)
            )
        else:
            assert status.record_lease(expires_at=180.0), "a lease ends the stop"
        assert baseline(status) == (None, 40), allow
        # Captured legitimately while allowed, then paused again: a fresh baseline.
        ack_pause(status, paused(epoch=7, since=130.0), at=131.0, events=90)
        beat(status, paused(epoch=7, since=130.0), at=142.0, events=90)
        assert baseline(status) == (131.0, 90), allow
        assert state(paused(epoch=7, since=130.0), status, now=143.0) is (
            ComplianceState.VERIFIED_STOPPED
        ), allow
    assert not connected().record_lease(expires_at=60.0), "no stop to end"


def test_earliest_unacknowledged_evidence_is_the_violation() -> None:
    status = connected()
    assert status.merge_violation("spool grew", 120.0)
    assert status.merge_violation("upload dated after the stop", 110.0), "an earlier one wins"
    assert not status.merge_violation("screen active", 130.0)
    assert (status.violation, status.violation_at) == ("upload dated after the stop", 110.0)


def test_fleet_compliance() -> None:
    s = ComplianceState
    assert fleet_compliant(
        [
            (Mode.PAUSED, s.VERIFIED_STOPPED),
            (Mode.PAUSED, s.OFFLINE_LEASE_EXPIRED),
            (Mode.ALLOWED, s.RESUME_PENDING),
        ]
    )
    assert not fleet_compliant([(Mode.PAUSED, s.STOP_REPORTED)])
    assert not fleet_compliant([(Mode.PAUSED, s.OFFLINE_AT_RISK)])
    assert not fleet_compliant([(Mode.ALLOWED, s.VIOLATION)])
    assert fleet_compliant([])


def test_spool_is_purged_unless_every_covering_hold_keeps_it() -> None:
    keep = dataclasses.replace(hold("k", Scope.fleet(), 1), keep_spool=True)
    purge = hold("p", Scope.selector({"org": "infra"}), 2)
    assert not reconcile_desired(None, "a", LABELS, [keep], epoch=1, now=0).purge_spool
    assert reconcile_desired(None, "a", LABELS, [keep, purge], epoch=2, now=0).purge_spool


def test_a_copied_status_is_a_replace_under_a_revision_of_its_own() -> None:
    """The writer's and the replicas' copy: every field as ``dataclasses.replace`` would
    set it, a revision no other state has had, and no tie to the original."""
    status = connected(at=99.0)
    ack_pause(status, paused())
    twin = status.copied(lease_expires_at=500.0)
    assert twin == dataclasses.replace(status, lease_expires_at=500.0)
    assert twin.revision != status.revision
    twin.record_disconnect(600.0)
    assert status.connected and not twin.connected
    with pytest.raises(TypeError, match="no field 'epoch'"):
        status.copied(epoch=3)
