"""The gateway's sink: append-only files per agent and day, each with a manifest.

``DIR/sink/<agent>/<YYYY-MM-DD>.log`` holds length-prefixed records (4-byte big-endian
length, then the batch as the agent sent it, serialized). Beside it,
``<YYYY-MM-DD>.manifest`` holds one JSON line per record: sequence, offset, length,
SHA-256, event count and capture times. Both are fsynced, the log first, before a batch
is acknowledged; the manifest is the truth: a log tail it does not describe (a crash
between the two writes) was never acknowledged, is never exported, and its sequence
number is accepted again.

Files rather than a database table: the sink is private to the gateway (directories
0700, files 0600, owned by the gateway's user), shares no database with anything, and
its only read path is ``killswitch ingest export``, which verifies every checksum.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from control.errors import InvalidInput, KillswitchError

SINK_DIR = "sink"
# Refused batches of agents paused with `--keep-spool`: kept for forensics, never exported
# as accepted data. Same layout, same privacy.
QUARANTINE_DIR = "quarantine"
LENGTH = struct.Struct(">I")
# Agent ids become directory names: nothing that could walk out of the sink.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    sequence: int
    offset: int
    length: int
    sha256: str
    events: int
    first_event_at: float
    last_event_at: float
    received_at: float


def day_of(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d")


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def _append(path: Path, data: bytes) -> int:
    """Append and fsync; returns the offset the data starts at."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        offset = os.fstat(fd).st_size
        os.write(fd, data)
        os.fsync(fd)
        return offset
    finally:
        os.close(fd)


def agent_dir(root: Path, agent_id: str) -> Path:
    if not _SAFE_NAME.match(agent_id):
        raise InvalidInput(f"agent id {agent_id[:100]!r} cannot name a sink directory")
    return root / agent_id


def read_manifest(path: Path) -> list[ManifestEntry]:
    """Every whole line; a torn last line (a crash mid-write) was never acknowledged."""
    entries = []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            entries.append(ManifestEntry(**json.loads(line)))
        except (ValueError, TypeError):
            continue
    return entries


class Sink:
    def __init__(self, data_dir: Path, kind: str = SINK_DIR) -> None:
        self.root = data_dir / kind
        _private_dir(self.root)
        self._next: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def agent_dir(self, agent_id: str) -> Path:
        return agent_dir(self.root, agent_id)

    def lock(self, agent_id: str) -> asyncio.Lock:
        """Held across check, ask and write: one agent's batches land one at a time."""
        return self._locks.setdefault(agent_id, asyncio.Lock())

    def next_sequence(self, agent_id: str) -> int:
        """From the newest manifest on disk the first time, so a restart reopens nothing."""
        known = self._next.get(agent_id)
        if known is None:
            known = 1
            manifests = sorted(self.agent_dir(agent_id).glob("*.manifest"))
            for manifest in reversed(manifests):
                entries = read_manifest(manifest)
                if entries:
                    known = max(e.sequence for e in entries) + 1
                    break
            self._next[agent_id] = known
        return known

    def write(
        self,
        agent_id: str,
        sequence: int,
        record: bytes,
        *,
        events: int,
        first_event_at: float,
        last_event_at: float,
        received_at: float,
    ) -> ManifestEntry:
        """Blocking (fsync): run it in a thread."""
        directory = self.agent_dir(agent_id)
        _private_dir(directory)
        day = day_of(received_at)
        offset = _append(directory / f"{day}.log", LENGTH.pack(len(record)) + record)
        entry = ManifestEntry(
            sequence,
            offset,
            LENGTH.size + len(record),
            hashlib.sha256(record).hexdigest(),
            events,
            first_event_at,
            last_event_at,
            received_at,
        )
        line = json.dumps(asdict(entry), sort_keys=True) + "\n"
        _append(directory / f"{day}.manifest", line.encode())
        self._next[agent_id] = sequence + 1
        return entry


def verified_records(
    data_dir: Path, agent_id: str, day: str | None = None, kind: str = SINK_DIR
) -> Iterator[tuple[ManifestEntry, bytes]]:
    """Every record the manifests describe, each checked against its checksum."""
    directory = agent_dir(data_dir / kind, agent_id)
    if day is not None and not _DAY.match(day):
        raise InvalidInput(f"--day {day!r}: expected YYYY-MM-DD")
    pattern = f"{day}.manifest" if day else "*.manifest"
    manifests = sorted(directory.glob(pattern))
    if not manifests:
        raise KillswitchError(f"no data for agent {agent_id!r} in {directory}")
    for manifest in manifests:
        log_path = manifest.with_suffix(".log")
        with log_path.open("rb") as log:
            for entry in read_manifest(manifest):
                log.seek(entry.offset)
                raw = log.read(entry.length)
                (length,) = LENGTH.unpack(raw[: LENGTH.size])
                record = raw[LENGTH.size :]
                if length != len(record) or hashlib.sha256(record).hexdigest() != entry.sha256:
                    raise KillswitchError(
                        f"{log_path}: record of sequence {entry.sequence} at offset"
                        f" {entry.offset} does not match its checksum"
                    )
                yield entry, record
