"""What the gateway checks by itself, before and after asking the control plane.

Pure functions and a small cache, so each rule is tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from control.domain.compliance import CLOCK_SKEW_ALLOWANCE

# Size caps: a batch is 30 s of one laptop's capture; anything near these is not.
MAX_EVENTS_PER_BATCH = 5_000
MAX_BATCH_BYTES = 1024 * 1024  # serialized, payloads and framing together
# Whatever an agent's clock says, its events are never given more benefit of the
# doubt than this (seconds): a liar claiming a skewed clock gains at most this much.
MAX_SKEW_ALLOWANCE = 10.0


class Refusal(Exception):
    """A batch refused before the control plane is asked; ``code`` names the gRPC status."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class BatchShape:
    """What the checks need of a batch (the request, decoded). Not frozen: one is made
    per upload, and a frozen dataclass's ``__init__`` costs five times as much."""

    agent_id: str
    sequence: int
    # The events' count and their first and last capture times (seconds; 0 when empty).
    events: int
    first_event_at: float
    last_event_at: float
    batch_bytes: int
    sent_at: float


def skew_allowance(sent_at: float, received_at: float) -> float:
    """How far this agent's clock may be off, measured on this batch: the gap between
    when it says it sent and when we received, plus the plane's usual allowance, capped."""
    return min(abs(sent_at - received_at) + CLOCK_SKEW_ALLOWANCE, MAX_SKEW_ALLOWANCE)


def check_shape(batch: BatchShape, received_at: float) -> float:
    """Size, emptiness and dates; returns the batch's skew allowance."""
    count = batch.events
    if count == 0:
        raise Refusal("INVALID_ARGUMENT", "empty batch: send at least one event")
    if batch.sequence < 1:
        raise Refusal("INVALID_ARGUMENT", "sequence numbers start at 1")
    if count > MAX_EVENTS_PER_BATCH:
        raise Refusal(
            "RESOURCE_EXHAUSTED",
            f"batch of {count} events: at most {MAX_EVENTS_PER_BATCH} per batch",
        )
    if batch.batch_bytes > MAX_BATCH_BYTES:
        raise Refusal(
            "RESOURCE_EXHAUSTED",
            f"batch of {batch.batch_bytes} bytes: at most {MAX_BATCH_BYTES} per batch",
        )
    if batch.sent_at <= 0:
        raise Refusal("INVALID_ARGUMENT", "sent_at missing: the gateway measures the clock with it")
    allowance = skew_allowance(batch.sent_at, received_at)
    latest = batch.last_event_at
    if latest > received_at + allowance:
        raise Refusal(
            "INVALID_ARGUMENT",
            f"event dated {latest - received_at:.1f} s in the future"
            f" (clock allowance {allowance:.1f} s): fix the laptop's clock",
        )
    if batch.first_event_at <= 0:
        raise Refusal("INVALID_ARGUMENT", "every event needs its capture time")
    return allowance


def sequence_refusal(sequence: int, expected: int) -> str:
    """Why ``sequence`` is not the one expected, or '' when it is."""
    if sequence == expected:
        return ""
    if sequence < expected:
        return f"sequence {sequence} is a replay: batches up to {expected - 1} are already in"
    return f"sequence {sequence} skips ahead: the next expected is {expected}"


def after_stop_refusal(last_event_at: float, stopped_at: float | None, allowance: float) -> str:
    """Why a batch holds events captured after the agent's stop, or '' when it does not."""
    if stopped_at is None or last_event_at <= stopped_at + allowance:
        return ""
    return (
        f"events captured up to {last_event_at - stopped_at:.1f} s after the agent stopped"
        f" (clock allowance {allowance:.1f} s)"
    )
