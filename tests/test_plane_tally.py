"""The fleet status read from the tally (``control/plane/tally.py``) is exactly what a
full evaluation of every agent says, at every moment of a random incident.

The tally re-evaluates an agent only when its facts change or its verdict's time runs
out; a fact it failed to notice (a lease, an ack deadline passing, a replaced entry, a
hold that changed the desired state) would leave a stale count. Each step below is a
random plane operation or a jump of the clock, and after each the tally's fleet status
is compared with ``views()``, which evaluates every agent afresh.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from pathlib import Path

import pytest

from control.domain import CaptureReport
from control.domain import ComplianceState
from control.domain import Mode
from control.domain import Scope
from control.domain import is_settled
from control.errors import Conflict
from control.plane import ControlPlane
from control.store import AgentChanges
from tests.fake_clock import FakeClock
from tests.plane_support import IC
from tests.plane_support import SRE
from tests.plane_support import STOPPED
from tests.plane_support import RecordingStore
from tests.plane_support import Session
from tests.plane_support import run_plane
from tests.test_plane_replicas import remote_row

AGENTS = [f"laptop-{n}" for n in range(12)]
REMOTE = [f"elsewhere-{n}" for n in range(4)]  # served by replica r2
MOVED = CaptureReport(events_total=99)
FROZEN = CaptureReport(events_total=10)


def assert_tally_matches_a_full_evaluation(plane: ControlPlane) -> None:
    views = plane.views()
    summary = plane.status(unsettled_limit=len(views))
    assert summary.by_state == Counter(v.compliance.state for v in views)
    assert summary.total == len(views)
    unsettled = [v for v in views if not is_settled(v.desired.mode, v.compliance.state)]
    assert [v.agent_id for v in summary.unsettled] == [v.agent_id for v in unsettled]
    assert [v.compliance for v in summary.unsettled] == [v.compliance for v in unsettled]
    assert summary.settled == len(views) - len(unsettled)
    census = plane.census()
    assert {s: n for s, n in census.by_state.items() if n} == summary.by_state


async def random_step(
    plane: ControlPlane,
    clock: FakeClock,
    rng: random.Random,
    holds: list[str],
    sessions: dict[str, Session],
) -> None:
    agent = rng.choice(AGENTS)
    view = plane.agent_view(agent)
    steps = ["connect", "disconnect", "ack", "nack", "beat", "lease", "hold", "lift", "wait"]
    step = rng.choice([*steps, "ok", "row"])
    if step == "row":  # another replica's row for an agent it serves: a new status object
        row = remote_row(
            rng.choice(REMOTE),
            "r2",
            clock.now - rng.choice([0.0, 40.0]),
            connected=rng.random() < 0.8,
            mode=rng.choice(list(Mode)),
        )
        beat_age = rng.choice([0.5, 30.0])
        plane.adopt_agents(AgentChanges([row], {"r2": beat_age}, str(rng.random())))
    elif step == "connect":
        sessions[agent] = Session(plane, agent)
        plane.connect(agent, {"team": rng.choice("ab")}, sessions[agent])
    elif view is None:
        clock.advance(1.0)  # never connected: nothing else applies to it yet
    elif step == "disconnect" and agent in sessions:
        plane.disconnect(agent, sessions.pop(agent))
    elif step == "ack":
        epoch = plane.directive_for(agent).epoch
        mode = rng.choice([view.desired.mode] * 3 + list(Mode))
        plane.ack(agent, epoch, mode, STOPPED, rng.choice([FROZEN, FROZEN, MOVED]))
    elif step == "nack":
        plane.nack(agent, plane.directive_for(agent).epoch, "cannot stop")
    elif step == "beat":
        plane.heartbeat(agent, STOPPED, rng.choice([FROZEN, FROZEN, MOVED]))
    elif step == "lease":
        plane.grant_lease(agent)
    elif step == "hold":
        scope = rng.choice([Scope.fleet(), Scope.selector({"team": "a"})])
        hold, _ = await plane.create_hold(scope, "drill", "INC-1", IC)
        holds.append(hold.id)
    elif step == "lift" and holds:
        await plane.lift_hold(holds.pop(rng.randrange(len(holds))), IC)
    elif step == "ok":
        with contextlib.suppress(Conflict):  # no violation to acknowledge
            await plane.acknowledge_violation(agent, SRE, "looked into it")
    else:  # time passes: deadlines, leases and silences run out
        clock.advance(rng.choice([0.5, 3.0, 11.0, 31.0, 45.0, 130.0]))


@pytest.mark.parametrize("seed", range(6))
def test_the_fleet_status_from_the_tally_is_a_full_evaluation(tmp_path: Path, seed: int) -> None:
    async def scenario(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        rng, holds, sessions = random.Random(seed), list[str](), dict[str, Session]()
        for _ in range(250):
            await random_step(plane, clock, rng, holds, sessions)
            assert_tally_matches_a_full_evaluation(plane)

    run_plane(tmp_path, scenario, replica_id="me")


def test_a_row_that_replaces_an_agents_status_is_counted_afresh(tmp_path: Path) -> None:
    """Another replica's newer row brings a new status object whose revision may equal
    the old one's (both fresh from a row): the tally notices the object, not the number."""

    async def scenario(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        plane.adopt_agents(AgentChanges([remote_row("a", "r2", clock.now)], {"r2": 0.5}, "1"))
        assert_tally_matches_a_full_evaluation(plane)
        clock.advance(1.0)
        gone = remote_row("a", "r2", clock.now, connected=False)
        plane.adopt_agents(AgentChanges([gone], {"r2": 0.5}, "2"))
        assert plane.status().by_state == {ComplianceState.OFFLINE: 1}
        assert_tally_matches_a_full_evaluation(plane)

    run_plane(tmp_path, scenario, replica_id="me")
