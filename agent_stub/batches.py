"""Capture batches as the ingest gateway takes them, and the agent's batch numbering.

Every batch carries a per-agent sequence number: 1 for the first, one more for each
batch the gateway accepted. The gateway refuses a replay or a gap, so the number
only ever goes up: after an acceptance, or when a refusal names a higher number the
gateway expects. A refusal naming a lower one (a gateway that lost its state) is not
followed: a number once sent with data is never sent again with other data.

A reference agent keeps the next number in its state directory across restarts
(written after the gateway accepted, so a crash in between costs a refused replay,
never a gap); the simulator keeps it in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import structlog
from killswitch.v1 import killswitch_pb2 as pb

from agent_stub.capture import EVENTS_PER_TICK
from agent_stub.capture import Batch
from agent_stub.durable import StateFileError
from agent_stub.durable import read_state
from agent_stub.durable import save_or_warn
from agent_stub.durable import write_durably
from agent_stub.wire import timestamp

# Events per uploaded batch; a larger spool goes up over the next rounds, oldest first.
MAX_EVENTS_PER_BATCH = 500
SEQUENCE_FILE = "upload-sequence.json"
log = structlog.get_logger("killswitch.agent.upload")
# Events of a batch take turns between the channels as often as the channels capture.
CHANNEL_TURNS = tuple(name for name, per_tick in EVENTS_PER_TICK.items() for _ in range(per_tick))


def upload_request(
    agent_id: str, sequence: int, batch: Batch, sent_at: float
) -> pb.UploadBatchRequest:
    """The batch's events, a few bytes of payload each, and their capture times.

    Filled in place (no intermediate messages): a fleet of 10,000 builds ~330 a second.
    """
    request = pb.UploadBatchRequest(agent_id=agent_id, sequence=sequence)
    request.sent_at.CopyFrom(timestamp(sent_at))
    turns = len(CHANNEL_TURNS)
    times = batch.capture_times()
    for i in range(len(times)):
        request.events.add(channel=CHANNEL_TURNS[i % turns], payload=f"{sequence}.{i}".encode())
    request.captured_at_unix_nano.extend(int(at * 1e9) for at in times)
    return request


class SequenceStore:
    """``DIR/upload-sequence.json``: ``{"next": N}``."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / SEQUENCE_FILE

    def load(self) -> int:
        """The next sequence number; 1 if this agent never had a batch accepted.

        An unreadable file stops the agent: starting again at 1 would replay numbers
        the gateway already holds data under.
        """
        number = read_state(
            self.path,
            lambda raw: raw["next"],
            missing=1,
            remedy="remove it only if the ingest gateway forgot this laptop's batches too",
        )
        if not isinstance(number, int) or number < 1:
            raise StateFileError(f"{self.path}: next {number!r} is not a positive whole number")
        return number

    def save(self, number: int) -> None:
        write_durably(self.path, json.dumps({"next": number}))


class UploadSequence:
    """The sequence number of the agent's next batch; it never goes down."""

    def __init__(self, store: SequenceStore | None = None) -> None:
        self._store = store
        self.next = store.load() if store is not None else 1

    def accepted(self, sequence: int) -> None:
        self._advance(sequence + 1)

    def refused(self, next_sequence: int) -> None:
        """Follow the gateway's expected number, only if it is higher than ours."""
        self._advance(next_sequence)

    def _advance(self, number: int) -> None:
        if number <= self.next:
            return
        self.next = number
        # A lost write is harmless: after a restart, a refusal names the number again.
        save_or_warn(self._store, number, log.warning, "upload_sequence_not_saved")
