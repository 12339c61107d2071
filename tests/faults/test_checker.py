"""The checker must fail when the promise breaks, or the fault suite proves nothing."""

from __future__ import annotations

from typing import Any

from tests.faults.checker import Pause
from tests.faults.checker import check

TTL = 5.0


def truth(*rows: dict[str, Any]) -> dict[str, Any]:
    return {"trigger_at": None, "agents": list(rows)}


def agent(
    agent_id: str,
    spans: list[list[float]],
    applied: list[list[Any]] | None = None,
    *,
    fault: str = "none",
    capturing: bool = False,
) -> dict[str, Any]:
    return {
        "agent_id": agent_id,
        "fault": fault,
        "spans": spans,
        "applied": applied or [],
        "capturing": capturing,
    }


def test_capture_within_the_lease_ttl_after_a_pause_is_allowed() -> None:
    verdict = check("t", truth(agent("a", [[0.0, 106.0]])), [Pause(100.0)], lease_ttl=TTL)
    assert verdict.holds(), verdict.late


def test_capture_past_the_lease_ttl_is_late() -> None:
    verdict = check("t", truth(agent("a", [[0.0, 108.0]])), [Pause(100.0)], lease_ttl=TTL)
    assert [late.agent_id for late in verdict.late] == ["a"]
    assert not verdict.holds()


def test_agents_outside_the_scope_and_capture_after_the_lift_are_not_late() -> None:
    rows = truth(agent("a", [[0.0, 45.0], [130.0, 140.0]]), agent("b", [[0.0, 140.0]]))
    verdict = check("t", rows, [Pause(40.0, frozenset({"a"}), lifted_at=120.0)], lease_ttl=TTL)
    assert verdict.holds(), verdict.late


def test_capture_after_an_older_allowed_is_a_rollback() -> None:
    applied = [[10.0, 7, "MODE_PAUSED"], [20.0, 6, "MODE_ALLOWED"]]
    verdict = check("t", truth(agent("a", [[21.0, 30.0]], applied)), [], lease_ttl=TTL)
    assert len(verdict.late) == 1 and "epoch 7" in verdict.late[0].why
    applied.append([40.0, 8, "MODE_ALLOWED"])
    verdict = check("t", truth(agent("a", [[41.0, 50.0]], applied)), [], lease_ttl=TTL)
    assert verdict.holds()


def test_a_liar_is_excused_only_when_every_replica_flags_it() -> None:
    rows = truth(agent("liar", [[0.0, 200.0]], fault="lie", capturing=True))
    flagged = {"liar": {"state": "VIOLATION"}}
    fooled = {"liar": {"state": "VERIFIED_STOPPED"}}
    assert check("t", rows, [Pause(100.0)], lease_ttl=TTL, server_states=[flagged]).holds()
    verdict = check("t", rows, [Pause(100.0)], lease_ttl=TTL, server_states=[flagged, fooled])
    assert verdict.liars == 1 and verdict.liars_flagged == 0 and verdict.late


def test_a_verdict_that_contradicts_the_truth_is_counted_wrong() -> None:
    rows = truth(agent("a", [[0.0, 10.0]], capturing=True))
    verdict = check(
        "t", rows, [], lease_ttl=TTL, server_states=[{"a": {"state": "VERIFIED_STOPPED"}}]
    )
    assert (verdict.verdicts_scored, verdict.verdicts_right) == (1, 0)
    assert not verdict.holds()
