"""``Compliance.until``: how long a verdict holds while no new fact arrives.

The fleet census re-evaluates an agent only when its facts change or its verdict's
``until`` comes. If ``until`` were ever later than the moment the state really changes
(an ack deadline passing, a lease running out, a stream falling silent), the census
would show a state the agent has left: these properties would catch it.
"""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from control.domain import AgentStatus
from control.domain import CaptureReport
from control.domain import CompliancePolicy
from control.domain import Desired
from control.domain import Mode
from control.domain import evaluate

_gap = st.floats(min_value=0.0, max_value=60.0, allow_nan=False)
_epoch = st.integers(min_value=1, max_value=3)
_report = st.sampled_from([CaptureReport()] * 5 + [CaptureReport(events_total=1)])


@st.composite
def facts(draw: st.DrawFn) -> tuple[Desired, AgentStatus, CompliancePolicy, float]:
    """Facts as the plane records them: a connect, then a random history in time order
    (acks, nacks, heartbeats, leases, disconnects and reconnects) through
    ``AgentStatus``'s own methods, so every reachable state comes up (CAPTURING under a
    lease, STOP_REPORTED, VERIFIED_STOPPED, OVERDUE, silent...), and a moment after it."""
    mode = draw(st.sampled_from(Mode))
    desired = Desired(mode, ("h",), "r", draw(_epoch), draw(_gap))
    policy = CompliancePolicy(
        ack_deadline=draw(st.floats(min_value=1.0, max_value=60.0)),
        heartbeat_interval=draw(st.floats(min_value=1.0, max_value=30.0)),
    )
    status = AgentStatus()
    at = desired.since + draw(_gap)
    status.record_connect(at)
    steps = st.sampled_from(["ack", "ack", "beat", "beat", "lease", "nack", "drop", "connect"])
    for step in draw(st.lists(steps, max_size=8)):
        at += draw(_gap)
        if step == "ack":
            acked = draw(st.sampled_from([mode, mode, mode, *Mode]))
            epoch = draw(st.sampled_from([desired.epoch, desired.epoch, 1, 3]))
            status.record_ack(epoch, acked, {}, draw(_report), at, desired=desired)
        elif step == "beat":
            status.record_heartbeat(
                {}, draw(_report), at, desired=desired, verify_after=policy.verify_after
            )
        elif step == "lease":
            status.record_lease(at + draw(st.floats(min_value=1.0, max_value=120.0)))
        elif step == "nack":
            status.record_nack(draw(_epoch), "cannot", at)
        elif step == "drop":
            status.record_disconnect(at)
        else:
            status.record_connect(at)
    later = st.floats(min_value=0.0, max_value=5.0) | st.floats(min_value=0.0, max_value=200.0)
    return desired, status, policy, at + draw(later)


@given(facts(), st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_a_verdict_holds_at_every_moment_before_its_until(
    given_facts: tuple[Desired, AgentStatus, CompliancePolicy, float], fraction: float
) -> None:
    desired, status, policy, now = given_facts
    verdict = evaluate(desired, status, now=now, policy=policy)
    assert verdict.until >= now
    span = min(verdict.until, now + 10_000.0) - now
    moments = [now + span * fraction]
    if math.isfinite(verdict.until) and verdict.until > now:  # the last moment it holds
        moments.append(math.nextafter(verdict.until, -math.inf))
    for later in moments:
        if later < verdict.until:
            assert evaluate(desired, status, now=later, policy=policy).state is verdict.state


@given(facts())
def test_the_state_changes_just_past_until(
    given_facts: tuple[Desired, AgentStatus, CompliancePolicy, float],
) -> None:
    """``until`` is tight, not merely safe: every clock that decides a verdict (an ack
    deadline, a lease, a silent stream) changes the state when it runs out, so a census
    that waited past ``until`` would be late, and one that rechecks at it is not."""
    desired, status, policy, now = given_facts
    verdict = evaluate(desired, status, now=now, policy=policy)
    if math.isfinite(verdict.until):
        after = math.nextafter(verdict.until, math.inf)
        assert evaluate(desired, status, now=after, policy=policy).state is not verdict.state


def test_capturing_holds_until_the_lease_or_the_silence_whichever_comes_first() -> None:
    policy = CompliancePolicy(ack_deadline=30.0, heartbeat_interval=10.0)  # silent after 31 s
    desired = Desired(Mode.ALLOWED, (), "no active hold", 1, 0.0)
    status = AgentStatus()
    status.record_connect(1.0)
    status.record_ack(1, Mode.ALLOWED, {}, CaptureReport(), 2.0, desired=desired)
    for lease, until in ((20.0, 20.0), (90.0, 33.0)):
        status.record_lease(lease)
        verdict = evaluate(desired, status, now=3.0, policy=policy)
        assert (verdict.state.value, verdict.until) == ("CAPTURING", until)
