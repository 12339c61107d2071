"""Readiness: which laptops would not honour a pause if one were issued now, and why.

Asked before an incident, not during one. Each laptop is judged from what the
control plane already knows of it (its last contact, what its last Hello said, its
certificate, its lease) against a policy; every class is a plain function of those
facts, so the CLI, the dashboard and the metric give the same answer.

Two severities:

- **cannot honour**: a pause would not reach or bind the laptop as promised (never
  connected; offline longer than the policy allows; an agent older than the minimum;
  a lease clock that stops while the laptop sleeps, so an expired lease is honoured
  late; a lease outlasting the policy's TTL). ``killswitch readiness`` exits 1.
- **warning**: a pause binds it today, but something will bite (clock skew makes its
  evidence timestamps doubtful; disputed labels mean a selector pause follows the
  server's labels, not the laptop's word; its certificate expires soon, after which
  it cannot connect at all).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from enum import StrEnum

from control.domain.timings import DEFAULT_LEASE_TTL_SECONDS
from control.errors import InvalidInput

DAY = 86_400.0
DEFAULT_OFFLINE_DAYS = 7.0
DEFAULT_MAX_CLOCK_SKEW_SECONDS = 60.0
DEFAULT_CERTIFICATE_WARNING_DAYS = 14.0
# What Hello.lease_clock says on a platform with no clock known to count sleep.
NO_SLEEP_CLOCK = "none"


class ReadinessClass(StrEnum):
    NEVER_CONNECTED = "never-connected"
    OFFLINE = "offline"
    OLD_AGENT = "old-agent"
    NO_SLEEP_CLOCK = "no-sleep-clock"
    LEASE_ABOVE_POLICY = "lease-above-policy"
    CLOCK_SKEW = "clock-skew"
    LABELS_DISPUTED = "labels-disputed"
    CERTIFICATE_EXPIRING = "certificate-expiring"

    @property
    def cannot_honour(self) -> bool:
        return self not in _WARNINGS


_WARNINGS = frozenset(
    {
        ReadinessClass.CLOCK_SKEW,
        ReadinessClass.LABELS_DISPUTED,
        ReadinessClass.CERTIFICATE_EXPIRING,
    }
)


@dataclass(frozen=True, slots=True)
class HelloFacts:
    """What an agent said of itself on its latest stream ("" / None: it did not say)."""

    agent_version: str = ""
    lease_clock: str = ""
    # Agent wall clock minus the server's when the Hello arrived (positive: ahead).
    clock_skew: float | None = None


# An agent that has said nothing of itself (yet, or since this replica started).
UNSAID = HelloFacts()


@dataclass(frozen=True, slots=True)
class ReadinessPolicy:
    offline_days: float = DEFAULT_OFFLINE_DAYS
    # Empty: any version will do.
    min_agent_version: str = ""
    max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW_SECONDS
    certificate_warning_days: float = DEFAULT_CERTIFICATE_WARNING_DAYS
    # The longest lease a laptop may hold: the server's lease TTL.
    lease_ttl: float = DEFAULT_LEASE_TTL_SECONDS

    def __post_init__(self) -> None:
        if self.min_agent_version:
            parse_version(self.min_agent_version)

    def describe(self) -> str:
        minimum = self.min_agent_version or "any"
        return (
            f"offline at most {self.offline_days:g} days; agent version >= {minimum};"
            f" clock skew at most {self.max_clock_skew:g}s; certificates valid"
            f" {self.certificate_warning_days:g} more days; leases at most {self.lease_ttl:g}s"
        )


def parse_version(text: str) -> tuple[int, ...]:
    """``agent-stub/0.2.0`` or ``0.2.0`` -> ``(0, 2, 0)``: the numbers after the last '/'."""
    numbers = re.fullmatch(r"v?(\d+(?:\.\d+)*)", text.rsplit("/", 1)[-1].strip())
    if numbers is None:
        raise InvalidInput(f"not a version: {text[:60]!r} (want e.g. 0.2.0 or agent-stub/0.2.0)")
    return tuple(int(n) for n in numbers.group(1).split("."))


@dataclass(frozen=True, slots=True)
class AgentFacts:
    """What the plane knows of one laptop, as plain values."""

    agent_id: str
    last_seen: float | None = None
    connected: bool = False
    hello: HelloFacts = UNSAID
    # Keys where the laptop's own report contradicts the server's labels.
    disputed_labels: Mapping[str, tuple[str | None, str | None]] = field(default_factory=dict)
    # The newest unrevoked certificate issued to it; None without mTLS.
    certificate_not_after: float | None = None
    lease_expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Finding:
    agent_id: str
    classes: tuple[ReadinessClass, ...]
    details: tuple[str, ...]

    @property
    def cannot_honour(self) -> bool:
        return any(c.cannot_honour for c in self.classes)


@dataclass(frozen=True, slots=True)
class ReadinessReport:
    agents: int
    findings: tuple[Finding, ...]
    policy: ReadinessPolicy

    @property
    def ready(self) -> int:
        return self.agents - len(self.findings)

    @property
    def cannot_honour(self) -> bool:
        return any(f.cannot_honour for f in self.findings)

    def counts(self) -> dict[ReadinessClass, int]:
        """Laptops per class, every class present (zeros too); a laptop counts in each."""
        counts = dict.fromkeys(ReadinessClass, 0)
        for finding in self.findings:
            for cls in finding.classes:
                counts[cls] += 1
        return counts


def _days(seconds: float) -> str:
    return f"{seconds / DAY:.1f} days"


def classify(
    facts: AgentFacts, policy: ReadinessPolicy, now: float
) -> list[tuple[ReadinessClass, str]]:
    """Every class this laptop is in, each with a one-line why."""
    found: list[tuple[ReadinessClass, str]] = []
    if facts.last_seen is None:
        found.append((ReadinessClass.NEVER_CONNECTED, "expected, never connected"))
    elif not facts.connected and now - facts.last_seen > policy.offline_days * DAY:
        found.append((ReadinessClass.OFFLINE, f"last seen {_days(now - facts.last_seen)} ago"))
    hello = facts.hello
    if policy.min_agent_version and hello.agent_version:
        try:
            old = parse_version(hello.agent_version) < parse_version(policy.min_agent_version)
        except InvalidInput:  # a version we cannot read is no proof of a recent agent
            old = True
        if old:
            found.append(
                (
                    ReadinessClass.OLD_AGENT,
                    f"agent {hello.agent_version[:60]} below {policy.min_agent_version}",
                )
            )
    if hello.lease_clock == NO_SLEEP_CLOCK:
        found.append((ReadinessClass.NO_SLEEP_CLOCK, "its lease clock stops while it sleeps"))
    lease = facts.lease_expires_at
    if lease is not None and lease - now > policy.lease_ttl:
        found.append(
            (
                ReadinessClass.LEASE_ABOVE_POLICY,
                f"holds a lease for {lease - now:.0f}s more, policy {policy.lease_ttl:g}s",
            )
        )
    if hello.clock_skew is not None and abs(hello.clock_skew) > policy.max_clock_skew:
        found.append(
            (
                ReadinessClass.CLOCK_SKEW,
                f"clock {hello.clock_skew:+.0f}s off, bound {policy.max_clock_skew:g}s",
            )
        )
    if facts.disputed_labels:
        disputed = ", ".join(
            f"{key}={server or '(none)'} but says {said}"
            for key, (server, said) in sorted(facts.disputed_labels.items())
        )
        found.append((ReadinessClass.LABELS_DISPUTED, disputed[:200]))
    expiry = facts.certificate_not_after
    if expiry is not None and expiry - now < policy.certificate_warning_days * DAY:
        left = "expired" if expiry <= now else f"expires in {_days(expiry - now)}"
        found.append((ReadinessClass.CERTIFICATE_EXPIRING, f"certificate {left}"))
    return found


def assess(fleet: Iterable[AgentFacts], policy: ReadinessPolicy, now: float) -> ReadinessReport:
    """Judge every laptop; findings in agent id order, ready laptops counted only."""
    agents = 0
    findings = []
    for facts in sorted(fleet, key=lambda f: f.agent_id):
        agents += 1
        found = classify(facts, policy, now)
        if found:
            findings.append(
                Finding(facts.agent_id, tuple(c for c, _ in found), tuple(d for _, d in found))
            )
    return ReadinessReport(agents, tuple(findings), policy)
