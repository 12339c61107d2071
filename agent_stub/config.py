"""What an agent is (id, labels, version) and how it is paced."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field

from agent_stub.batches import MAX_EVENTS_PER_BATCH

# What the agent assumes until the server's first directive says otherwise: the server's
# own defaults (control/domain/timings.py), which agent_stub may not import;
# tests/test_settings.py holds the two equal.
DEFAULT_LEASE_TTL_SECONDS = 60.0
DEFAULT_HEARTBEAT_SECONDS = 10.0
# After acking a pause, the agent sends its capture report (a heartbeat) this long
# later, or two capture ticks if longer: past the server's proof window
# (DEFAULT_PROOF_WINDOW_SECONDS, 2 s), so frozen counters verify the stop in seconds
# rather than at the next heartbeat. The report says how long ago the ack went
# (``seconds_since_ack``, on this agent's monotonic clock), which the server takes within
# what its own clock allows; so an ack that queued on a busy server needs no extra
# margin here. (4 s until 2026-12-06, when the server measured the window only
# between processing the ack and the report: at 2.5 s, 10,000 agents on one server were
# verified only by their next heartbeat.)
PROOF_REPORT_DELAY_SECONDS = 2.2


@dataclass(frozen=True, slots=True)
class Tuning:
    """Capture and upload pacing.

    ``batch_events`` below the default lets a drill build a backlog of several batches
    in seconds, as a laptop offline for days would.
    """

    capture_tick: float = 1.0
    upload_every: float = 30.0
    batch_events: int = MAX_EVENTS_PER_BATCH

    @property
    def proof_report_delay(self) -> float:
        """How long after a pause ack the agent sends its capture report."""
        return max(PROOF_REPORT_DELAY_SECONDS, 2 * self.capture_tick)


# What this agent reports as its version in Hello.
AGENT_VERSION = "agent-stub/0.2.0"


@dataclass(slots=True)
class AgentConfig:
    agent_id: str
    labels: dict[str, str] = field(default_factory=dict)
    tuning: Tuning = field(default_factory=Tuning)
    # What Hello says (a simulator rehearses an old fleet or a drifting clock with these).
    agent_version: str = AGENT_VERSION
    # Seconds this agent's wall clock runs ahead of true time (negative: behind).
    clock_skew: float = 0.0
