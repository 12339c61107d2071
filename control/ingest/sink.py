"""The gateway's sink: append-only files per agent and day, each with a manifest.

``DIR/sink/<agent>/<YYYY-MM-DD>.log`` holds length-prefixed records (4-byte big-endian
length, then the batch's bytes exactly as the agent sent them). Beside it,
``<YYYY-MM-DD>.manifest`` holds one JSON line per record: sequence, offset, length,
SHA-256, event count and capture times. The manifest is the index; a record is
exported only through its line, and only if its checksum holds.

Files rather than a database table: the sink is private to the gateway (directories
0700, files 0600, owned by the gateway's user), shares no database with anything, and
its only read path is ``killswitch ingest export``, which verifies every checksum.

**Group commit.** One committer takes every batch waiting and lands them together: all
their log records and manifest lines, then one file-system sync, and only then is any
of them acknowledged. So a batch costs a share of one sync, not ``fsync`` calls of its
own (at 10k agents the per-batch fsyncs, queued through a thread pool under each
agent's lock, were most of the gateway's time). The sync is ``syncfs(2)`` on Linux (one
call makes every file and directory entry of the group durable, and reports write-back
errors since Linux 5.8); elsewhere each touched file and new directory is fsynced.
``syncfs`` also writes back whatever else is dirty on that file system: give the sink a
volume of its own.

**A crash mid-commit.** Until the sync returns, any part of the group may or may not be
on disk: a manifest line may describe a record that never made it. Such a batch was
never acknowledged, and it is always its agent's newest: the gateway holds an agent's
lock from a batch's checks until its commit, so the agent's previous batch was durable
before this one was written. So the newest manifest's trailing lines whose records do
not match their checksums (and a torn last line) are *unconfirmed*: never exported,
and cut away the first time the gateway touches that agent again, so the agent's retry
of that number is accepted, and nothing is appended after a torn line.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import fcntl
import hashlib
import json
import math
import os
import re
import struct
import sys
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import structlog

from control.errors import InvalidInput
from control.errors import KillswitchError
from control.events import ObserverFailures
from control.events import name_of

log = structlog.get_logger("killswitch.ingest")

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
# Commits start at most this often. A sync costs the kernel a walk of the file system
# whatever it carries, and a group costs the gateway's one thread a hand-off to the
# syncing thread and back: under a burst, 20 ms of batches share one (at most 20 ms
# more before "accepted"); a batch arriving after a quiet spell is committed at once.
# (10 ms until 2026-12-06: the 10,000-upload round took 3.5-3.7 s of gateway CPU in
# about 350 commits a round; at 20 ms, 3.3 s in about 180.)
MIN_COMMIT_INTERVAL_SECONDS = 0.020


# Not frozen, like Batch: one of each is made per upload, and a frozen dataclass's
# ``__init__`` (``object.__setattr__`` per field) costs five times a plain one's.
@dataclass(slots=True)
class ManifestEntry:
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


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_durable(root: Path, files: Iterable[str], new_dirs: Iterable[Path]) -> None:
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


def _append(path: str, data: bytes) -> int:
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


# Beside the sink in the gateway's data directory: held by the gateway for its life.
LOCK_FILE = "gateway.lock"


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


def check_agent_id(agent_id: str) -> None:
    """Raise unless ``agent_id`` can name a directory of the sink (per upload: no Path)."""
    if not _SAFE_NAME.match(agent_id):
        raise InvalidInput(f"agent id {agent_id[:100]!r} cannot name a sink directory")


def agent_dir(root: Path, agent_id: str) -> Path:
    check_agent_id(agent_id)
    return root / agent_id


def read_manifest(path: Path) -> list[ManifestEntry]:
    """Every whole line; a torn last line (a crash mid-write) was never acknowledged."""
    try:
        lines = path.read_bytes().split(b"\n")[:-1]  # after the last newline: torn
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        with contextlib.suppress(ValueError, TypeError):
            entries.append(_entry(line))
    return entries


def _entry(line: bytes) -> ManifestEntry:
    return ManifestEntry(**json.loads(line))


def _lines_from_the_end(raw: bytes) -> Iterator[tuple[ManifestEntry, int]]:
    """Each whole line's entry, newest first, with the manifest's length up to its end.

    From the end: a restarted gateway needs only the newest line of each agent, not a
    parse of the whole day."""
    end = raw.rfind(b"\n")
    while end >= 0:
        start = raw.rfind(b"\n", 0, end) + 1
        with contextlib.suppress(ValueError, TypeError):
            yield _entry(raw[start:end]), end + 1
        end = start - 1


def _record(log: BinaryIO, entry: ManifestEntry) -> bytes | None:
    """The record ``entry`` describes, or None when the log does not hold it intact."""
    log.seek(entry.offset)
    raw = log.read(entry.length)
    record = raw[LENGTH.size :]
    if len(raw) < LENGTH.size or LENGTH.unpack(raw[: LENGTH.size])[0] != len(record):
        return None
    return record if hashlib.sha256(record).hexdigest() == entry.sha256 else None


@dataclass(frozen=True, slots=True)
class ConfirmedEnd:
    """Where a manifest's confirmed part ends (see the module's docstring)."""

    last: ManifestEntry | None  # its newest confirmed entry
    manifest_bytes: int  # the manifest's length up to that entry's line
    log_bytes: int  # the log's length up to that entry's record


def confirmed_end(manifest: Path) -> ConfirmedEnd:
    """The newest line whose record is intact: what follows it was never acknowledged."""
    try:
        raw = manifest.read_bytes()
        log_file = manifest.with_suffix(".log").open("rb")
    except FileNotFoundError:
        return ConfirmedEnd(None, 0, 0)
    with log_file:
        for entry, line_end in _lines_from_the_end(raw):
            if _record(log_file, entry) is not None:
                return ConfirmedEnd(entry, line_end, entry.offset + entry.length)
    return ConfirmedEnd(None, 0, 0)


def _cut_unconfirmed(manifest: Path) -> ManifestEntry | None:
    """Cut what a crash mid-commit left of a group never acknowledged; the newest entry."""
    end = confirmed_end(manifest)
    cut = manifest.stat().st_size - end.manifest_bytes
    if cut:
        os.truncate(manifest, end.manifest_bytes)
        log.warning("unconfirmed_batch_cut", manifest=str(manifest), bytes=cut)
    log_path = manifest.with_suffix(".log")
    if log_path.exists() and log_path.stat().st_size > end.log_bytes:
        os.truncate(log_path, end.log_bytes)
    return end.last


_MANIFEST_KEYS = sorted(ManifestEntry.__dataclass_fields__)

Waiting = tuple[Batch, "asyncio.Future[ManifestEntry]"]


class Sink:
    """The files, each agent's next sequence number, and the group committer."""

    def __init__(
        self,
        data_dir: Path,
        kind: str = SINK_DIR,
        *,
        on_landed: Callable[[Batch], None] = lambda batch: None,
        on_commit: Callable[[float, int], None] = lambda seconds, size: None,
        failures: ObserverFailures | None = None,
    ) -> None:
        """``on_landed`` hears of each batch made durable (the gateway reports it to the
        control plane), ``on_commit`` the seconds and size of each group commit (the
        gateway's metrics): both through the observer guard, so neither can stop the
        committer that every upload waits on."""
        self.root = data_dir / kind
        _private_dir(self.root)
        self._next: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._dirs: dict[str, str] = {}  # agent -> its directory, known to exist
        self._days: dict[int, str] = {}
        self.observer_failures = failures = failures or ObserverFailures()
        self._on_landed = failures.guarded("landed", [(name_of(on_landed), on_landed)])
        self._on_commit = failures.guarded("commit", [(name_of(on_commit), on_commit)])
        self._waiting: list[Waiting] = []
        self._wake = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._closing = False

    def agent_dir(self, agent_id: str) -> Path:
        return agent_dir(self.root, agent_id)

    def lock(self, agent_id: str) -> asyncio.Lock:
        """Held across check, ask and write: one agent's batches land one at a time."""
        lock = self._locks.get(agent_id)
        if lock is None:
            lock = self._locks[agent_id] = asyncio.Lock()
        return lock

    def next_sequence(self, agent_id: str) -> int:
        """From the newest manifest on disk the first time, so a restart reopens nothing."""
        known = self._next.get(agent_id)
        if known is None:
            known = self._next[agent_id] = self._newest_sequence(agent_id) + 1
        return known

    def _newest_sequence(self, agent_id: str) -> int:
        """After cutting an unconfirmed tail; 0 for an agent with nothing landed."""
        manifests = sorted(self.agent_dir(agent_id).glob("*.manifest"))
        if not manifests:
            return 0
        newest = _cut_unconfirmed(manifests[-1])
        for older in reversed(manifests[:-1]):  # when the newest day holds nothing (now)
            if newest is not None:
                break
            newest = next(_lines_from_the_end(older.read_bytes()), (None, 0))[0]
        return newest.sequence if newest else 0

    # ------------------------------------------------------------ writing

    def write_group(self, batches: Sequence[Batch]) -> list[ManifestEntry]:
        """Land every batch, durably, or raise (then none of them is acknowledged).

        Blocking, for tools and tests; the gateway's committer does the same in two
        steps (the appends on the loop, the sync in a thread).
        """
        entries, files, new_dirs = self._append_group(batches)
        make_durable(self.root, files, new_dirs)
        return entries

    def _append_group(
        self, batches: Sequence[Batch]
    ) -> tuple[list[ManifestEntry], set[str], list[Path]]:
        """Records, then manifest lines (page cache only; not yet durable)."""
        entries, files, new_dirs = self._append_records(batches)
        files |= self._append_manifest_lines(batches, entries)
        return entries, files, new_dirs

    def _append_records(
        self, batches: Sequence[Batch]
    ) -> tuple[list[ManifestEntry], set[str], list[Path]]:
        """Every batch's record at the end of its log (page cache only; not yet durable)."""
        new_dirs, logs, entries = [], set(), []
        for batch in batches:
            directory = self._dirs.get(batch.agent_id)
            if directory is None:
                path = self.agent_dir(batch.agent_id)
                if not path.exists():
                    _private_dir(path)
                    new_dirs.append(path)
                directory = self._dirs[batch.agent_id] = str(path)
            log_path = f"{directory}/{self._day(batch.received_at)}.log"
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
        return entries, logs, new_dirs

    def _append_manifest_lines(
        self, batches: Sequence[Batch], entries: Sequence[ManifestEntry]
    ) -> set[str]:
        manifests = set()
        for batch, entry in zip(batches, entries, strict=True):
            manifest = f"{self._dirs[batch.agent_id]}/{self._day(batch.received_at)}.manifest"
            _append(manifest, manifest_line(entry))
            manifests.add(manifest)
        return manifests

    def _day(self, at: float) -> str:
        """YYYY-MM-DD (UTC), remembered per day: computed once, not once per batch."""
        key = int(at // 86_400)
        day = self._days.get(key)
        if day is None:
            day = self._days[key] = day_of(at)
        return day

    def start(self) -> None:
        """Start the committer; ``append`` needs it."""
        self._committer = asyncio.create_task(
            self._commit_forever(), name=f"sink-commit-{self.root.name}"
        )

    async def close(self) -> None:
        """Land what is queued, then stop."""
        if self._committer is not None:
            self._closing = True
            self._wake.set()
            await self._committer
            self._committer = None

    async def append(self, batch: Batch) -> ManifestEntry:
        """Queue ``batch`` for the next group commit and wait for it to be durable.

        The agent's next sequence number moves (and ``on_landed`` runs) when the group
        lands, even if the caller stopped waiting: a batch on disk is never forgotten.
        """
        if self._committer is None:
            raise RuntimeError("Sink.start() first")
        future: asyncio.Future[ManifestEntry] = asyncio.get_running_loop().create_future()
        self._waiting.append((batch, future))
        self._wake.set()
        return await future

    async def _commit_forever(self) -> None:
        """One group at a time; whatever arrives during a commit forms the next group.

        The appends run here, on the loop: a record of a few KiB goes to the page cache
        in microseconds. Only the syncs wait in a thread, one call per group, so the
        loop never trades the GIL with a writer thread per system call.
        """
        last_started = -math.inf
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                pause = last_started + MIN_COMMIT_INTERVAL_SECONDS - time.monotonic()
                if pause > 0 and not self._closing:
                    await asyncio.sleep(pause)
                last_started = time.monotonic()
                group = self._waiting[:MAX_GROUP]
                del self._waiting[:MAX_GROUP]
                batches = [batch for batch, _ in group]
                try:
                    entries, files, new_dirs = self._append_group(batches)
                    await asyncio.to_thread(make_durable, self.root, files, new_dirs)
                except OSError as exc:
                    self._settle(group, exc)
                    continue
                self._on_commit(time.monotonic() - last_started, len(group))
                self._settle(group, entries)
            if self._closing:
                return

    def _settle(self, group: list[Waiting], outcome: list[ManifestEntry] | OSError) -> None:
        """Move the sequence numbers, report, and answer the waiting uploads."""
        if isinstance(outcome, OSError):
            for batch, future in group:
                # What landed before the failure is read back from disk next time.
                self._next.pop(batch.agent_id, None)
                if not future.done():
                    future.set_exception(outcome)
            return
        for (batch, future), entry in zip(group, outcome, strict=True):
            self._next[batch.agent_id] = batch.sequence + 1
            self._on_landed(batch)
            if not future.done():
                future.set_result(entry)


def manifest_line(entry: ManifestEntry) -> bytes:
    """One JSON line, keys sorted: what ``json.dumps`` writes for the entry, formatted
    directly (a third of the cost, per batch; the test holds the two equal). A float
    ``repr`` would not write as ``json.dumps`` does (NaN, infinity) takes the slow way."""
    times = (entry.first_event_at, entry.last_event_at, entry.received_at)
    if not all(map(math.isfinite, times)):
        fields = {name: getattr(entry, name) for name in _MANIFEST_KEYS}
        return (json.dumps(fields) + "\n").encode()
    return (
        f'{{"events": {entry.events:d}, "first_event_at": {entry.first_event_at!r},'
        f' "last_event_at": {entry.last_event_at!r}, "length": {entry.length:d},'
        f' "offset": {entry.offset:d}, "received_at": {entry.received_at!r},'
        f' "sequence": {entry.sequence:d}, "sha256": "{entry.sha256}"}}\n'
    ).encode()


def verified_records(
    data_dir: Path, agent_id: str, day: str | None = None, kind: str = SINK_DIR
) -> Iterator[tuple[ManifestEntry, bytes]]:
    """Every confirmed record the manifests describe, each checked against its checksum.

    A mismatch anywhere but the newest manifest's unconfirmed tail is corruption, and
    raises.
    """
    directory = agent_dir(data_dir / kind, agent_id)
    if day is not None and not _DAY.match(day):
        raise InvalidInput(f"--day {day!r}: expected YYYY-MM-DD")
    every_day = sorted(directory.glob("*.manifest"))
    manifests = [m for m in every_day if day is None or m.name == f"{day}.manifest"]
    if not manifests:
        raise KillswitchError(f"no data for agent {agent_id!r} in {directory}")
    for manifest in manifests:
        log_path = manifest.with_suffix(".log")
        entries = read_manifest(manifest)
        if manifest == every_day[-1]:
            last = confirmed_end(manifest).last
            entries = [e for e in entries if last is not None and e.sequence <= last.sequence]
        with log_path.open("rb") as log_file:
            for entry in entries:
                record = _record(log_file, entry)
                if record is None:
                    raise KillswitchError(
                        f"{log_path}: record of sequence {entry.sequence} at offset"
                        f" {entry.offset} does not match its checksum"
                    )
                yield entry, record
