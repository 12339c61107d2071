"""Readiness classes, one by one, from plain facts (``control.domain.readiness``)."""

from __future__ import annotations

import pytest

from control.domain.readiness import DAY
from control.domain.readiness import AgentFacts
from control.domain.readiness import HelloFacts
from control.domain.readiness import ReadinessClass
from control.domain.readiness import ReadinessPolicy
from control.domain.readiness import assess
from control.domain.readiness import classify
from control.domain.readiness import parse_version
from control.errors import InvalidInput

NOW = 1_000_000_000.0
POLICY = ReadinessPolicy(min_agent_version="0.2.0", lease_ttl=60.0)
GOOD_HELLO = HelloFacts("agent-stub/0.2.0", "CLOCK_BOOTTIME", clock_skew=1.5)


def healthy(**changes: object) -> AgentFacts:
    fields: dict[str, object] = {
        "agent_id": "laptop-1",
        "last_seen": NOW,
        "connected": True,
        "hello": GOOD_HELLO,
        "certificate_not_after": NOW + 90 * DAY,
        "lease_expires_at": NOW + 30,
    }
    fields.update(changes)
    return AgentFacts(**fields)  # type: ignore[arg-type]


def classes(facts: AgentFacts, policy: ReadinessPolicy = POLICY) -> list[ReadinessClass]:
    return [cls for cls, _ in classify(facts, policy, NOW)]


def test_a_healthy_laptop_is_in_no_class() -> None:
    assert classes(healthy()) == []


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (healthy(last_seen=None, connected=False), ReadinessClass.NEVER_CONNECTED),
        (healthy(last_seen=NOW - 8 * DAY, connected=False), ReadinessClass.OFFLINE),
        (healthy(hello=HelloFacts("agent-stub/0.1.9", "CLOCK_BOOTTIME")), ReadinessClass.OLD_AGENT),
        (healthy(hello=HelloFacts("agent-stub/dev", "CLOCK_BOOTTIME")), ReadinessClass.OLD_AGENT),
        (healthy(hello=HelloFacts("agent-stub/0.2.0", "none")), ReadinessClass.NO_SLEEP_CLOCK),
        (healthy(lease_expires_at=NOW + 3600), ReadinessClass.LEASE_ABOVE_POLICY),
        (
            healthy(hello=HelloFacts("agent-stub/0.2.0", "CLOCK_BOOTTIME", clock_skew=-120.0)),
            ReadinessClass.CLOCK_SKEW,
        ),
        (healthy(disputed_labels={"org": ("eng", "marketing")}), ReadinessClass.LABELS_DISPUTED),
        (healthy(certificate_not_after=NOW + 13 * DAY), ReadinessClass.CERTIFICATE_EXPIRING),
        (healthy(certificate_not_after=NOW - 1), ReadinessClass.CERTIFICATE_EXPIRING),
    ],
)
def test_each_class_is_found_alone(facts: AgentFacts, expected: ReadinessClass) -> None:
    assert classes(facts) == [expected]


def test_the_boundaries_are_inclusive_of_the_policy() -> None:
    assert classes(healthy(last_seen=NOW - 7 * DAY, connected=False)) == []
    assert classes(healthy(lease_expires_at=NOW + 60)) == []
    skew_at_bound = HelloFacts("agent-stub/0.2.0", "CLOCK_BOOTTIME", clock_skew=60.0)
    assert classes(healthy(hello=skew_at_bound)) == []
    assert classes(healthy(certificate_not_after=NOW + 14 * DAY)) == []
    # Connected now: however long ago its last report, it is not offline.
    assert classes(healthy(last_seen=NOW - 30 * DAY, connected=True)) == []


def test_what_an_agent_did_not_say_is_not_held_against_it() -> None:
    """An old agent without the field, or one not heard from since a restart."""
    assert classes(healthy(hello=HelloFacts())) == []
    assert classes(healthy(certificate_not_after=None)) == []
    assert classes(healthy(), ReadinessPolicy()) == []


def test_severities_split_cannot_honour_from_warnings() -> None:
    warnings = {
        ReadinessClass.CLOCK_SKEW,
        ReadinessClass.LABELS_DISPUTED,
        ReadinessClass.CERTIFICATE_EXPIRING,
    }
    assert {c for c in ReadinessClass if not c.cannot_honour} == warnings


def test_a_report_counts_laptops_per_class_and_says_whether_any_cannot_honour() -> None:
    fleet = [
        healthy(agent_id="b-ok"),
        healthy(agent_id="a-old", hello=HelloFacts("agent-stub/0.1.0", "none")),
        healthy(agent_id="c-skew", hello=HelloFacts("agent-stub/0.2.0", "x", clock_skew=900)),
    ]
    report = assess(fleet, POLICY, NOW)
    assert (report.agents, report.ready) == (3, 1)
    assert [f.agent_id for f in report.findings] == ["a-old", "c-skew"]
    assert report.findings[0].cannot_honour and not report.findings[1].cannot_honour
    counts = report.counts()
    assert counts[ReadinessClass.OLD_AGENT] == counts[ReadinessClass.NO_SLEEP_CLOCK] == 1
    assert counts[ReadinessClass.CLOCK_SKEW] == 1 and counts[ReadinessClass.OFFLINE] == 0
    assert report.cannot_honour
    assert not assess(fleet[1:][1:], POLICY, NOW).cannot_honour


def test_versions_compare_as_numbers() -> None:
    assert parse_version("agent-stub/0.10.0") > parse_version("0.9.3")
    assert parse_version("v1.2") == (1, 2)
    with pytest.raises(InvalidInput, match="not a version"):
        ReadinessPolicy(min_agent_version="latest")
