"""The sink's files on disk, and the one way to read them back (checksums verified).

``DIR/sink/<YYYY-MM-DD>.log`` holds the day's accepted batches from every agent, as
length-prefixed records (4-byte big-endian length, then the batch's bytes exactly as
the agent sent them). Beside it, ``<YYYY-MM-DD>.manifest`` holds one JSON line per
record: agent, sequence, offset, length, SHA-256, event count and capture times. The
manifest is the index: a record is read only through its line, and only if its
checksum holds.

One log and one manifest per day for the whole gateway, not a pair per agent: making
a group of batches durable then costs two ``fdatasync`` calls, whatever the number of
agents in it. With a pair of files per agent, the 10,000-agent upload round dirtied
20,000 files, and the sync that covered them kept the gateway waiting on the disk for
a third of the round (BENCHMARKS.md, 2026-12-06).

**Every manifest line points at a durable record.** A group's records are appended to
the log and synced *before* its manifest lines are written; the lines are synced
before any batch of the group is acknowledged. So a crash can leave only (a) record
bytes that no line points at, dead space a reader never visits, and (b) a torn last
manifest line, which readers skip and the gateway cuts when it opens the day again.
Neither was ever acknowledged. A checksum that fails on a whole line is corruption,
and stops an export.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from control.errors import InvalidInput
from control.errors import KillswitchError

SINK_DIR = "sink"
# Refused batches of agents paused with `--keep-spool`: kept for forensics, never exported
# as accepted data. Same layout, same privacy.
QUARANTINE_DIR = "quarantine"
LENGTH = struct.Struct(">I")
# Agent ids are written into manifest lines unescaped, and named on export command lines.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DAY_MANIFEST = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9].manifest"
# Beside the sink in the gateway's data directory: held by the gateway for its life.
LOCK_FILE = "gateway.lock"


# Not frozen, like Batch: one of each is made per upload, and a frozen dataclass's
# ``__init__`` (``object.__setattr__`` per field) costs five times a plain one's.
@dataclass(slots=True)
class ManifestEntry:
    """One manifest line: where a batch's record is, and what it holds."""

    agent: str
    sequence: int
    offset: int
    length: int
    sha256: str
    events: int
    first_event_at: float
    last_event_at: float
    received_at: float


@dataclass(slots=True)
class Batch:
    """One upload the gateway decided to keep, as it goes to disk."""

    agent_id: str
    sequence: int
    record: bytes
    events: int
    first_event_at: float
    last_event_at: float
    received_at: float


def day_of(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d")


def check_agent_id(agent_id: str) -> None:
    """Raise unless ``agent_id`` is safe to write unescaped into a manifest line."""
    if not _SAFE_NAME.match(agent_id):
        raise InvalidInput(f"agent id {agent_id[:100]!r} cannot be stored in the sink")


def private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def claim_data_dir(data_dir: Path) -> int:
    """Hold ``DIR/gateway.lock`` (``flock``) for as long as the returned descriptor stays
    open, or raise. Two gateways on one directory would each keep their own idea of every
    agent's next sequence number and append to the same files: a replay accepted twice,
    manifests pointing at the other's records. The kernel lets go when the process ends,
    however it ends, so a crash never leaves a stale lock."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise KillswitchError(
            f"{data_dir} is in use by another gateway (it holds {path}):"
            " one gateway per data directory"
        ) from None
    return fd


_MANIFEST_KEYS = sorted(ManifestEntry.__dataclass_fields__)


def manifest_line(entry: ManifestEntry) -> bytes:
    """One JSON line, keys sorted: what ``json.dumps`` writes for the entry, formatted
    directly (a third of the cost, per batch; the test holds the two equal). A float
    ``repr`` would not write as ``json.dumps`` does (NaN, infinity), nor would an agent
    id that needs escaping: those take the slow way."""
    times = (entry.first_event_at, entry.last_event_at, entry.received_at)
    if not (all(map(math.isfinite, times)) and _SAFE_NAME.match(entry.agent)):
        fields = {name: getattr(entry, name) for name in _MANIFEST_KEYS}
        return (json.dumps(fields) + "\n").encode()
    return (
        f'{{"agent": "{entry.agent}", "events": {entry.events:d},'
        f' "first_event_at": {entry.first_event_at!r},'
        f' "last_event_at": {entry.last_event_at!r}, "length": {entry.length:d},'
        f' "offset": {entry.offset:d}, "received_at": {entry.received_at!r},'
        f' "sequence": {entry.sequence:d}, "sha256": "{entry.sha256}"}}\n'
    ).encode()


def day_manifests(root: Path) -> list[Path]:
    """Every day's manifest under ``root``, oldest first."""
    return sorted(root.glob(_DAY_MANIFEST))


def manifest_entries(
    manifest: Path, start: int = 0, agent: str | None = None
) -> Iterator[tuple[ManifestEntry, int]]:
    """Each whole line's entry from byte ``start`` on, with the offset just past it.

    A torn last line (no newline: a crash mid-write, never acknowledged) is not one.
    With ``agent``, only that agent's lines are parsed: an export reads a day of the
    whole fleet, and the substring test costs a fraction of a JSON parse."""
    needle = f'"agent": "{agent}"'.encode() if agent is not None else None
    try:
        file = manifest.open("rb")
    except FileNotFoundError:
        return
    with file:
        file.seek(start)
        end = start
        for line in file:
            end += len(line)
            if not line.endswith(b"\n"):
                return
            if needle is not None and needle not in line:
                continue
            try:
                entry = ManifestEntry(**json.loads(line))
            except (ValueError, TypeError):
                continue
            if agent is None or entry.agent == agent:
                yield entry, end


def read_record(log: BinaryIO, entry: ManifestEntry) -> bytes | None:
    """The record ``entry`` describes, or None when the log does not hold it intact."""
    log.seek(entry.offset)
    raw = log.read(entry.length)
    record = raw[LENGTH.size :]
    if len(raw) < LENGTH.size or LENGTH.unpack(raw[: LENGTH.size])[0] != len(record):
        return None
    return record if hashlib.sha256(record).hexdigest() == entry.sha256 else None


def verified_records(
    data_dir: Path, agent_id: str | None, day: str | None = None, kind: str = SINK_DIR
) -> Iterator[tuple[ManifestEntry, bytes]]:
    """Every record the manifests describe (one agent's, or with None every agent's),
    each checked against its checksum; a mismatch is corruption, and raises."""
    if agent_id is not None:
        check_agent_id(agent_id)
    if day is not None and not _DAY.match(day):
        raise InvalidInput(f"--day {day!r}: expected YYYY-MM-DD")
    root = data_dir / kind
    manifests = [m for m in day_manifests(root) if day is None or m.stem == day]
    found = False
    for manifest in manifests:
        log_path = manifest.with_suffix(".log")
        with log_path.open("rb") as log_file:
            for entry, _ in manifest_entries(manifest, agent=agent_id):
                record = read_record(log_file, entry)
                if record is None:
                    raise KillswitchError(
                        f"{log_path}: record of {entry.agent} sequence {entry.sequence}"
                        f" at offset {entry.offset} does not match its checksum"
                    )
                found = True
                yield entry, record
    if not found and agent_id is not None:
        raise KillswitchError(f"no data for agent {agent_id!r} in {root}")
