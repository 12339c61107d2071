"""Dashboard timelines and live updates: a real pause pushed to an open event stream
and recorded in a laptop's timeline, and the timeline's bounds in memory."""

from __future__ import annotations

from collections.abc import Callable

from control.domain import Mode
from control.web.timeline import MAX_EVENTS_PER_AGENT
from control.web.timeline import MAX_EVENTS_TOTAL
from control.web.timeline import Timeline
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulator
from tests.conftest import wait_for
from tests.dashboard_support import EventStream
from tests.dashboard_support import session_for


def test_timeline_and_live_updates_after_a_pause(
    start_server: Callable[..., ServerProcess], simulate: Callable[..., Simulator]
) -> None:
    server = start_server()
    cli = Cli(server)
    simulate(server, 6, "--fault-after", "3600")
    wait_for(
        lambda: cli.json("status")["agents"]["by_state"].get("CAPTURING") == 6, 60, "capturing"
    )
    browser = session_for(server, "ic-1")
    with EventStream(server.http_port, browser.cookie) as events:
        first = events.next_message()
        assert first["summary"]["epoch"] == 0 and first["summary"]["pause"] is None
        hold = cli.pause("--all", "--reason", "drill", "--ticket", "INC-9")
        # Pushed within a tick or two, without asking: the new epoch, and "a hold changed".
        message = events.until(lambda m: m["summary"]["epoch"] == 1, timeout=5)
        assert message["summary"]["pause"]["hold_id"] == hold
        assert message["changed"] is None or "" in message["changed"]
        wait_for(
            lambda: cli.json("status")["agents"]["by_state"] == {"VERIFIED_STOPPED": 6},
            30,
            "the fleet verified stopped",
        )
        settled = events.until(lambda m: m["summary"]["compliant"], timeout=5)
        ttc = settled["summary"]["time_to_compliance"]
        assert (ttc["paused"], ttc["verified"], ttc["waiting"]) == (6, 6, 0)
        assert ttc["p50"]["verified"] and ttc["p50"]["seconds"] <= ttc["p99"]["seconds"]
        assert ttc["slowest"]["agent_id"].startswith("laptop-")

    data = browser.json("/api/agents/laptop-00000")
    assert data["agent"]["state"] == "VERIFIED_STOPPED" and data["agent"]["violation"] is None
    timeline = list(reversed(data["timeline"]))  # oldest first
    kinds = [e["kind"] for e in timeline]
    assert kinds[0] == "connected"
    after_hold = kinds[kinds.index("hold_created") :]
    assert "directive" in after_hold and "ack" in after_hold and "verified" in after_hold
    assert after_hold.index("directive") < after_hold.index("ack") < after_hold.index("verified")
    states = [e["state"] for e in timeline[kinds.index("hold_created") :] if e["state"]]
    assert states == ["PENDING", "STOP_REPORTED", "VERIFIED_STOPPED"]
    hold_event = timeline[kinds.index("hold_created")]
    assert hold in hold_event["text"] and "ic-1" in hold_event["text"]
    # Heartbeats are one entry per run, with a count.
    beats = [e for e in timeline if e["kind"] == "heartbeat"]
    assert beats and all(e["count"] >= 1 for e in beats)
    assert len(beats) <= kinds.count("ack") + kinds.count("verified") + 2
    page = browser.get("/agents/laptop-00000").text
    for text in ("sent PAUSED", "STOP_REPORTED", "stop verified", hold):
        assert text in page
    assert browser.get("/agents/no-such-laptop").status == 404


def test_the_timeline_stays_bounded_and_coalesces_heartbeats() -> None:
    timeline = Timeline()
    for i in range(3 * MAX_EVENTS_PER_AGENT):
        timeline.directive_sent("a", epoch=i, mode=Mode.PAUSED, at=float(i))
        timeline.heartbeat("a", at=i + 0.5)
        timeline.heartbeat("a", at=i + 0.7)
    rings = dict(timeline.iter_rings())
    assert rings["a"] == MAX_EVENTS_PER_AGENT
    events = timeline.events("a", {})
    assert events[-1].count == 2 and events[-1].last_at == 3 * MAX_EVENTS_PER_AGENT - 0.3  # type: ignore[union-attr]
    # A big fleet: the total stays within budget, every agent keeps its newest entries.
    fleet = 2 * MAX_EVENTS_TOTAL // MAX_EVENTS_PER_AGENT
    for round_ in range(MAX_EVENTS_PER_AGENT // 4):
        for n in range(fleet):
            timeline.directive_sent(f"agent-{n}", epoch=round_, mode=Mode.PAUSED, at=1e6 + round_)
    assert timeline.total_events <= MAX_EVENTS_TOTAL
    assert sum(n for _, n in timeline.iter_rings()) == timeline.total_events
    newest = timeline.events("agent-7", {})[-1]
    assert newest.epoch == MAX_EVENTS_PER_AGENT // 4 - 1


def test_changes_since_names_agents_and_gives_up_when_too_far_behind() -> None:
    timeline = Timeline()
    start = timeline.version
    timeline.acked("a", epoch=1, mode=Mode.PAUSED, latency=0.1, at=1.0)
    timeline.heartbeat("b", at=1.0)  # liveness alone is not a change
    timeline.nacked("c", epoch=1, reason="stuck", at=1.0)
    changes = timeline.changes_since(start)
    assert changes.agent_ids == frozenset({"a", "c"}) and changes.version == start + 2
    assert timeline.changes_since(changes.version).agent_ids == frozenset()
    for i in range(5000):
        timeline.connected(f"x{i}", reconnect=False, at=2.0)
    assert timeline.changes_since(start).agent_ids is None
