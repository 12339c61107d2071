"""The gateway's sink: append-only files per agent and day, each with a manifest.

``DIR/sink/<agent>/<YYYY-MM-DD>.log`` holds length-prefixed records (4-byte big-endian
length, then the batch as the agent sent it, serialized). Beside it,
``<YYYY-MM-DD>.manifest`` holds one JSON line per record: sequence, offset, length,
SHA-256, event count and capture times. The manifest is the truth: a log tail it does
not describe (a crash between the two writes) was never acknowledged, is never
exported, and its sequence number is accepted again.

Files rather than a database table: the sink is private to the gateway (directories
0700, files 0600, owned by the gateway's user), shares no database with anything, and
its only read path is ``killswitch ingest export``, which verifies every checksum.

**Group commit.** One writer thread takes every batch waiting and lands them together:
all their log records, one file-system sync, all their manifest lines, a second sync,
and only then is any of them acknowledged. So a batch costs two syncs shared with its
whole group, not two ``fsync`` calls of its own (at 10k agents the per-batch fsyncs,
queued through a thread pool under each agent's lock, were most of the gateway's time).
The sync is ``syncfs(2)`` on Linux (one call makes every file and directory entry of
the group durable, and reports write-back errors since Linux 5.8); elsewhere each
touched file and new directory is fsynced.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hashlib
import json
import os
import queue
import re
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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
# At most this many batches share one commit: a bound on a group's latency and memory.
MAX_GROUP = 2048


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


@dataclass(frozen=True, slots=True)
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


def _load_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    syncfs = getattr(libc, "syncfs", None)
    if syncfs is None:
        return None
    syncfs.argtypes = [ctypes.c_int]
    syncfs.restype = ctypes.c_int
    return syncfs  # type: ignore[no-any-return]


# Replaced by None in tests, to run the portable path on Linux too.
SYNCFS = _load_syncfs()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_durable(root: Path, files: Iterable[Path], new_dirs: Iterable[Path]) -> None:
    """Everything written under ``root`` so far survives a crash once this returns."""
    if SYNCFS is not None:
        fd = os.open(root, os.O_RDONLY)
        try:
            if SYNCFS(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs: {os.strerror(err)}")
        finally:
            os.close(fd)
        return
    for path in files:
        _fsync_path(path)
    for directory in new_dirs:  # the new entries, and the new directory in its parent
        _fsync_path(directory)
        _fsync_path(directory.parent)


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def _append(path: Path, data: bytes) -> int:
    """Append (no sync: the group's commit makes it durable); returns the data's offset."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        offset = os.fstat(fd).st_size
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
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


Waiting = tuple[Batch, "asyncio.Future[ManifestEntry]"]


class Sink:
    """The files, each agent's next sequence number, and the one writer thread."""

    def __init__(
        self,
        data_dir: Path,
        kind: str = SINK_DIR,
        *,
        on_landed: Callable[[Batch], None] | None = None,
    ) -> None:
        self.root = data_dir / kind
        _private_dir(self.root)
        self._next: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._made: set[Path] = set()  # agent directories known to exist (writer thread only)
        self._on_landed = on_landed
        self._waiting: queue.SimpleQueue[Waiting | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Observed by the gateway's metrics: seconds and size of each group commit.
        self.on_commit: Callable[[float, int], None] = lambda seconds, size: None

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

    # ------------------------------------------------------------ writing

    def write_group(self, batches: Sequence[Batch]) -> list[ManifestEntry]:
        """Land every batch, durably, or raise (then none of them is acknowledged).

        Blocking; the writer thread runs it. Logs first, synced, then manifests, synced:
        a manifest line never describes a record that could still be lost.
        """
        clock = time.monotonic()
        new_dirs = []
        for batch in batches:
            directory = self.agent_dir(batch.agent_id)
            if directory not in self._made:
                fresh = not directory.exists()
                _private_dir(directory)
                self._made.add(directory)
                if fresh:
                    new_dirs.append(directory)
        logs, entries = set(), []
        for batch in batches:
            log_path = self.agent_dir(batch.agent_id) / f"{day_of(batch.received_at)}.log"
            offset = _append(log_path, LENGTH.pack(len(batch.record)) + batch.record)
            logs.add(log_path)
            entries.append(
                ManifestEntry(
                    batch.sequence,
                    offset,
                    LENGTH.size + len(batch.record),
                    hashlib.sha256(batch.record).hexdigest(),
                    batch.events,
                    batch.first_event_at,
                    batch.last_event_at,
                    batch.received_at,
                )
            )
        make_durable(self.root, logs, new_dirs)
        manifests = set()
        for batch, entry in zip(batches, entries, strict=True):
            manifest = self.agent_dir(batch.agent_id) / f"{day_of(batch.received_at)}.manifest"
            _append(manifest, (json.dumps(asdict(entry), sort_keys=True) + "\n").encode())
            manifests.add(manifest)
        make_durable(self.root, manifests, ())
        self.on_commit(time.monotonic() - clock, len(batches))
        return entries

    def start(self) -> None:
        """Start the writer thread; ``append`` answers on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._writer = threading.Thread(
            target=self._write_forever, name=f"sink-writer-{self.root.name}", daemon=True
        )
        self._writer.start()

    async def close(self) -> None:
        """Land what is queued, then stop the writer."""
        if self._writer is not None:
            self._waiting.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None

    async def append(self, batch: Batch) -> ManifestEntry:
        """Queue ``batch`` for the next group commit and wait for it to be durable.

        The agent's next sequence number moves (and ``on_landed`` runs) when the group
        lands, even if the caller stopped waiting: a batch on disk is never forgotten.
        """
        if self._loop is None:
            raise RuntimeError("Sink.start() first")
        future: asyncio.Future[ManifestEntry] = self._loop.create_future()
        self._waiting.put((batch, future))
        return await future

    def _write_forever(self) -> None:
        while True:
            first = self._waiting.get()
            if first is None:
                return
            group, stopping = [first], False
            while len(group) < MAX_GROUP:
                try:
                    waiting = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if waiting is None:
                    stopping = True
                    break
                group.append(waiting)
            try:
                outcome: list[ManifestEntry] | OSError = self.write_group([b for b, _ in group])
            except OSError as exc:
                outcome = exc
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._settle, group, outcome)
            if stopping:
                return

    def _settle(self, group: list[Waiting], outcome: list[ManifestEntry] | OSError) -> None:
        """On the loop: move the sequence numbers, report, and answer the waiting uploads."""
        if isinstance(outcome, OSError):
            for batch, future in group:
                # What landed before the failure is read back from disk next time.
                self._next.pop(batch.agent_id, None)
                if not future.done():
                    future.set_exception(outcome)
            return
        for (batch, future), entry in zip(group, outcome, strict=True):
            self._next[batch.agent_id] = batch.sequence + 1
            if self._on_landed is not None:
                self._on_landed(batch)
            if not future.done():
                future.set_result(entry)


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
