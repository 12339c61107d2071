"""Compliance: how far each agent's observed state is from its desired state.

The ``status`` half of the spec/status pair. Everything here is a pure function
of recorded facts and the current time, so any replica (or a test) evaluating
the same facts reaches the same verdict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from control.domain.desired import Desired, Mode


class ComplianceState(StrEnum):
    # While the agent is meant to be paused.
    PENDING = "PENDING"
    STOP_REPORTED = "STOP_REPORTED"
    OVERDUE = "OVERDUE"
    FAILED = "FAILED"
    OFFLINE_AT_RISK = "OFFLINE_AT_RISK"
    VIOLATION = "VIOLATION"
    NEVER_SEEN = "NEVER_SEEN"
    # While the agent is allowed to capture.
    RESUME_PENDING = "RESUME_PENDING"
    CAPTURING = "CAPTURING"
    OFFLINE = "OFFLINE"


# States in which an agent has reached what its current epoch asks of it.
# Until independent verification exists, a reported stop is the strongest proof.
SETTLED = {
    Mode.PAUSED: frozenset({ComplianceState.STOP_REPORTED}),
    Mode.ALLOWED: frozenset(
        {ComplianceState.CAPTURING, ComplianceState.OFFLINE, ComplianceState.NEVER_SEEN}
    ),
}


@dataclass(frozen=True, slots=True)
class Compliance:
    state: ComplianceState
    reason: str
    since: float | None


@dataclass(slots=True)
class AgentStatus:
    """What the control plane has observed of one agent (never what it was told)."""

    expected_since: float | None = None
    first_seen: float | None = None
    last_seen: float | None = None
    connected: bool = False
    connected_at: float | None = None
    disconnected_at: float | None = None
    directive_sent_at: float | None = None
    directive_sent_epoch: int = 0
    acked_epoch: int = 0
    acked_mode: Mode | None = None
    acked_at: float | None = None
    nack_epoch: int = 0
    nack_reason: str = ""
    nack_at: float | None = None
    # Channel name -> active?, from the newest ack or heartbeat.
    channels: dict[str, bool] = field(default_factory=dict)
    # Only what the agent said on its current stream proves its current state: after a
    # reconnect (a restarted agent, a restarted server) older acks are history.
    acked_since_connect: bool = False
    nacked_since_connect: bool = False

    def record_connect(self, at: float) -> None:
        self.connected, self.connected_at, self.last_seen = True, at, at
        self.first_seen = self.first_seen or at
        self.acked_since_connect = self.nacked_since_connect = False

    def record_disconnect(self, at: float) -> None:
        self.connected, self.disconnected_at = False, at

    def record_ack(self, epoch: int, mode: Mode, channels: Mapping[str, bool], at: float) -> bool:
        """Record an ack unless it is older than one already recorded (a replay)."""
        self.last_seen = at
        if epoch < self.acked_epoch:
            return False
        self.acked_epoch, self.acked_mode, self.acked_at = epoch, mode, at
        self.channels = dict(channels)
        self.acked_since_connect = True
        return True

    def record_nack(self, epoch: int, reason: str, at: float) -> bool:
        self.last_seen = at
        if epoch < self.nack_epoch:
            return False
        self.nack_epoch, self.nack_reason, self.nack_at = epoch, reason, at
        self.nacked_since_connect = True
        return True

    def record_heartbeat(self, channels: Mapping[str, bool], at: float) -> bool:
        """Record liveness; return whether any channel changed state."""
        self.last_seen = at
        if channels == self.channels:
            return False
        self.channels = dict(channels)
        return True


def _active_channels(status: AgentStatus) -> list[str]:
    return sorted(name for name, active in status.channels.items() if active)


def evaluate(
    desired: Desired, status: AgentStatus, *, now: float, ack_deadline: float
) -> Compliance:
    """Classify one agent. Stale acks (older than ``desired.epoch``) never count."""
    paused = desired.mode is Mode.PAUSED
    if status.first_seen is None:
        return Compliance(
            ComplianceState.NEVER_SEEN,
            "expected from inventory, never connected",
            status.expected_since,
        )
    if not status.connected:
        if paused:
            return Compliance(
                ComplianceState.OFFLINE_AT_RISK,
                f"disconnected; last acked epoch {status.acked_epoch}"
                f" ({status.acked_mode or 'none'}), may still capture until it reconnects",
                status.disconnected_at,
            )
        return Compliance(ComplianceState.OFFLINE, "disconnected", status.disconnected_at)
    in_sync = (
        status.acked_since_connect
        and status.acked_mode is not None
        and status.acked_epoch >= desired.epoch
    )
    if paused:
        active = _active_channels(status)
        if in_sync and status.acked_mode is Mode.ALLOWED:
            return Compliance(
                ComplianceState.VIOLATION,
                f"acked epoch {status.acked_epoch} as ALLOWED while paused since"
                f" epoch {desired.epoch}",
                status.acked_at,
            )
        if in_sync and active:
            return Compliance(
                ComplianceState.VIOLATION,
                f"channels {','.join(active)} active after acking pause epoch {status.acked_epoch}",
                status.last_seen,
            )
        if in_sync:
            return Compliance(
                ComplianceState.STOP_REPORTED,
                f"acked epoch {status.acked_epoch}, every channel stopped",
                status.acked_at,
            )
    elif in_sync and status.acked_mode is Mode.ALLOWED:
        return Compliance(
            ComplianceState.CAPTURING, f"acked epoch {status.acked_epoch}", status.acked_at
        )
    if status.nacked_since_connect and status.nack_epoch >= desired.epoch:
        return Compliance(
            ComplianceState.FAILED,
            f"nacked epoch {status.nack_epoch}: {status.nack_reason}",
            status.nack_at,
        )
    waiting_since = max(desired.since, status.connected_at or desired.since)
    if now - waiting_since > ack_deadline:
        return Compliance(
            ComplianceState.OVERDUE,
            f"no ack for epoch {desired.epoch} within {ack_deadline:g}s",
            waiting_since + ack_deadline,
        )
    waiting = ComplianceState.PENDING if paused else ComplianceState.RESUME_PENDING
    return Compliance(waiting, f"awaiting ack for epoch {desired.epoch}", waiting_since)


def is_settled(mode: Mode, state: ComplianceState) -> bool:
    return state in SETTLED[mode]


def fleet_compliant(verdicts: Iterable[tuple[Mode, ComplianceState]]) -> bool:
    """Every paused agent settled, and no violation anywhere."""
    return all(
        state is not ComplianceState.VIOLATION and (mode is Mode.ALLOWED or is_settled(mode, state))
        for mode, state in verdicts
    )
