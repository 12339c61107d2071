"""Lease arithmetic and the ground-truth recorder, on an injected clock."""

from __future__ import annotations

import pytest

from agent_stub import Lease
from simulator.truth import GroundTruth
from tests.fake_clock import FakeClock


def test_no_lease_until_the_first_grant() -> None:
    clock = FakeClock()
    lease = Lease(clock)
    assert not lease.holds(clock()) and lease.remaining() == 0
    lease.request()
    assert not lease.holds(clock()), "asking is not holding"


def test_expiry_counts_from_when_the_request_was_sent() -> None:
    clock = FakeClock()
    lease = Lease(clock)
    request_id, sent_at = lease.request()
    assert sent_at == 1_000.0
    clock.advance(2.5)  # the grant takes a while to arrive
    assert lease.answer(request_id, granted=True, ttl=30)
    # The server counts from its grant (>= 1002.5); the agent from its send: never later.
    assert lease.expires_at == 1_030.0
    assert lease.remaining() == pytest.approx(27.5)
    assert lease.holds(1_029.999) and not lease.holds(1_030.0)


def test_renewal_moves_the_expiry_and_expiry_ends_capture() -> None:
    clock = FakeClock()
    lease = Lease(clock)
    first, _ = lease.request()
    lease.answer(first, granted=True, ttl=30)
    clock.advance(10)
    second, _ = lease.request()
    lease.answer(second, granted=True, ttl=30)
    assert lease.expires_at == 1_040.0
    clock.advance(30)  # no renewal arrives: the lease runs out by itself
    assert not lease.holds(clock())


def test_unknown_and_superseded_grants_are_ignored() -> None:
    clock = FakeClock()
    lease = Lease(clock)
    assert not lease.answer(99, granted=True, ttl=30), "never requested"
    old, _ = lease.request()
    clock.advance(5)
    new, _ = lease.request()
    assert lease.answer(new, granted=True, ttl=30)
    assert not lease.answer(old, granted=True, ttl=30), "older than the grant applied"
    assert not lease.answer(new, granted=True, ttl=30), "answered already"
    assert lease.expires_at == 1_035.0


def test_refusal_and_revocation_end_the_lease_at_once() -> None:
    clock = FakeClock()
    lease = Lease(clock)
    first, _ = lease.request()
    lease.answer(first, granted=True, ttl=30)
    renewal, _ = lease.request()
    assert lease.answer(renewal, granted=False, ttl=0)
    assert not lease.holds(clock())

    again, _ = lease.request()
    lease.answer(again, granted=True, ttl=30)
    in_flight, _ = lease.request()
    lease.revoke()  # a pause
    assert not lease.holds(clock())
    assert not lease.answer(in_flight, granted=True, ttl=30), "sent before the pause"
    assert not lease.holds(clock())


def test_truth_counts_only_events_past_the_lease_it_knows() -> None:
    truth = GroundTruth(capture_tick=1.0)
    truth.captured(at=5.0, count=3, wall=1.0)
    assert truth.events_without_lease == 3, "before any grant there is no lease"
    truth.lease_requested(1, at=10.0)
    truth.lease_answered(1, granted=True, ttl=30)
    truth.captured(at=39.9, count=4, wall=2.0)
    assert truth.events_without_lease == 3
    truth.captured(at=40.1, count=5, wall=3.0)
    assert truth.events_without_lease == 8
    assert truth.events_captured_total == 12 and truth.last_event_at == 3.0


def test_truth_ends_the_lease_at_an_obeyed_pause_and_ignores_grants_in_flight() -> None:
    truth = GroundTruth(capture_tick=1.0)
    truth.lease_requested(1, at=0.0)
    truth.lease_answered(1, granted=True, ttl=60)
    truth.lease_requested(2, at=10.0)
    truth.lease_revoked(at=12.0)
    truth.lease_answered(2, granted=True, ttl=60)
    truth.captured(at=11.0, count=1, wall=1.0)
    truth.captured(at=13.0, count=2, wall=2.0)
    assert truth.events_without_lease == 2


def test_truth_row_and_capturing_now() -> None:
    truth = GroundTruth(capture_tick=1.0)
    assert truth.row("a", "none", now=0.0) == {
        "agent_id": "a",
        "fault": "none",
        "events_captured_total": 0,
        "last_event_at": None,
        "events_without_lease": 0,
        "capturing": False,
        "spans": [],
        "applied": [],
        "batches_sent": 0,
        "events_sent": 0,
        "batches_accepted": 0,
        "events_accepted": 0,
        "batches_refused": 0,
        "last_accepted_event_at": None,
    }
    truth.captured(at=100.0, count=2, wall=1_700_000_000.0)
    assert truth.capturing(100.5)
    assert not truth.capturing(102.0), "no events at the latest tick"


def test_truth_spans_join_consecutive_ticks_and_split_at_a_gap() -> None:
    truth = GroundTruth(capture_tick=1.0)
    for at in (10.0, 11.0, 12.0, 20.0, 21.0):
        truth.captured(at=at, count=1, wall=at + 1000)
    truth.directive_applied(1015.0, 3, "MODE_PAUSED")
    assert truth.spans == [[1010.0, 1012.0], [1020.0, 1021.0]]
    assert truth.applied == [[1015.0, 3, "MODE_PAUSED"]]


def test_truth_counts_batches_sent_and_accepted_and_keeps_the_latest_accepted_time() -> None:
    truth = GroundTruth(capture_tick=1.0)
    truth.batch_sent(20)
    truth.batch_accepted(20, last_event_at=1_005.0)
    truth.batch_sent(7)
    truth.batch_refused()
    truth.batch_sent(7)
    truth.batch_accepted(7, last_event_at=1_003.0)  # a late answer for older events
    row = truth.row("a", "none", now=0.0)
    assert (row["batches_sent"], row["events_sent"]) == (3, 34)
    assert (row["batches_accepted"], row["events_accepted"], row["batches_refused"]) == (2, 27, 1)
    assert row["last_accepted_event_at"] == 1_005.0
