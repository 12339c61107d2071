"""How a simulated agent misbehaves, and for how long: its ``Fault`` and its config."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from enum import StrEnum

from agent_stub.config import AgentConfig


class Fault(StrEnum):
    """How a simulated agent misbehaves once the fault is triggered; real agents are NONE."""

    NONE = "none"
    # Reads directives and never acts on them or acks them; heartbeats and lease
    # renewals carry on, so its capture ends when the server stops renewing.
    IGNORE = "ignore"
    # A modified agent: acks a pause with every channel "stopped" and captures on
    # regardless of its lease (if already paused, it secretly starts again), with its
    # real counters in heartbeats and uploads.
    LIE = "lie"
    # The screen worker will not stop: the pause is nacked naming it (capture still
    # asks the lease, so it ends at expiry).
    STUBBORN = "stubborn"
    # Drops its stream, stays away for ``offline_for``, then reconnects normally.
    OFFLINE = "offline"
    # Applies and acks each directive after a random delay of up to ``slow_max``.
    SLOW = "slow"
    # The whole process is suspended for ``sleep_for`` while the boottime clock runs.
    SLEEP = "sleep"
    # A tampered agent that names its own labels: it reconnects at once claiming
    # ``org=marketing`` (``RELABEL_TO``), and is otherwise honest.
    RELABEL = "relabel"
    # A modified agent that hides: acks a pause as the honest agent does (every channel
    # stopped, spool purged or quarantined) and from then on reports those frozen
    # counters and stopped channels, while it captures on regardless of its lease and
    # uploads to the ingest gateway every round. Only the gateway can catch it.
    SILENT_LIAR = "silent-liar"
    # Lies as the silent liar does and never uploads anything (what it captures leaves
    # by another way): no server-side check can catch it.
    EXFILTRATOR = "exfiltrator"


# Modified agents that capture on regardless of their lease and a pause they acked.
CAPTURE_REGARDLESS = frozenset({Fault.LIE, Fault.SILENT_LIAR, Fault.EXFILTRATOR})
# Of those, the ones whose reports stop moving at the pause they pretend to obey.
FROZEN_REPORTS = frozenset({Fault.SILENT_LIAR, Fault.EXFILTRATOR})


# What a relabelling agent claims: an org no hold in the drills names.
RELABEL_TO = {"org": "marketing"}


@dataclass(frozen=True, slots=True)
class FaultTuning:
    """How long the faults last (None: derived from the lease TTL the agent last saw)."""

    slow_max: float = 20.0
    # Default: twice the lease TTL last seen.
    offline_for: float | None = None
    # Default: the lease TTL last seen plus 5 s.
    sleep_for: float | None = None

    def offline_seconds(self, lease_ttl: float) -> float:
        return self.offline_for if self.offline_for is not None else 2 * lease_ttl

    def sleep_seconds(self, lease_ttl: float) -> float:
        return self.sleep_for if self.sleep_for is not None else lease_ttl + 5.0


@dataclass(slots=True)
class SimulatedConfig(AgentConfig):
    """An agent's config, and the fault it turns to at the trigger (NONE: stays honest)."""

    fault: Fault = Fault.NONE
    fault_tuning: FaultTuning = field(default_factory=FaultTuning)
