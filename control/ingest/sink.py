"""The gateway's sink: the day's files (``sink_format``), written by group commit.

**Group commit.** One committer takes every batch waiting and lands them together:
their records go to the day's log in one write, the log is synced, their manifest lines
go to the day's manifest in one write, the manifest is synced, and only then is any of
them acknowledged. A group of 2,000 batches costs two ``fdatasync`` calls, the same as
a group of one. Commits start at most every ``MIN_COMMIT_INTERVAL_SECONDS``, so a burst
shares its syncs and a batch after a quiet spell is committed at once.

**A group that fails** (a write or a sync raises: a full disk, an I/O error) is cut
from both files, back to where it started, and every batch in it is answered with the
error: the agents keep their data and send it again under the same numbers. If even the
cut fails, the sink stops taking batches (fail closed) until the gateway is restarted,
which reads the files afresh.

**Each agent's next sequence number** lives in memory; ``sequences.json`` beside the
files is a snapshot of it, written atomically every minute and at a clean stop, with how
far into each day's manifest it reaches. A restarted gateway loads it and reads only the
manifest lines written after it: seconds of lines, not a day of them. Without a
snapshot (or with one that does not fit the files), it reads every manifest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from control.durable import sync_directory
from control.errors import KillswitchError
from control.events import ObserverFailures
from control.events import name_of
from control.ingest.sink_format import LENGTH
from control.ingest.sink_format import SINK_DIR
from control.ingest.sink_format import Batch
from control.ingest.sink_format import ManifestEntry
from control.ingest.sink_format import day_manifests
from control.ingest.sink_format import day_of
from control.ingest.sink_format import manifest_entries
from control.ingest.sink_format import manifest_line
from control.ingest.sink_format import private_dir
from control.pki_files import write_private

log = structlog.get_logger("killswitch.ingest")

# At most this many batches share one commit: a bound on a group's latency and memory.
MAX_GROUP = 2048
# Commits start at most this often: under a burst, 20 ms of batches share two syncs (at
# most 20 ms more before "accepted"); a batch arriving after a quiet spell is committed
# at once.
MIN_COMMIT_INTERVAL_SECONDS = 0.020
SEQUENCES_FILE = "sequences.json"
SNAPSHOT_INTERVAL_SECONDS = 60.0
# fdatasync where there is one: the data and the file's length, not its times.
_sync_data = getattr(os, "fdatasync", os.fsync)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _whole_lines_length(fd: int) -> int:
    """The manifest's length up to its last newline: a torn last line (a crash mid-write,
    never acknowledged) is cut before anything is appended after it."""
    size = os.fstat(fd).st_size
    end = size
    while end > 0:
        start = max(0, end - 4096)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    if end != size:
        os.ftruncate(fd, end)
        log.warning("torn_manifest_line_cut", bytes=size - end)
    return end


class DayFiles:
    """One day's log and manifest, open for appending, with the lengths written so far."""

    __slots__ = ("day", "log_fd", "log_size", "manifest_fd", "manifest_size", "unsynced_entry")

    def __init__(self, root: Path, day: str) -> None:
        log_path, manifest = root / f"{day}.log", root / f"{day}.manifest"
        self.day = day
        # A new file's name must be durable too: the root directory is synced once.
        self.unsynced_entry = not (log_path.exists() and manifest.exists())
        flags = os.O_CREAT | os.O_APPEND
        self.log_fd = os.open(log_path, os.O_WRONLY | flags, 0o600)
        self.manifest_fd = os.open(manifest, os.O_RDWR | flags, 0o600)
        self.log_size = os.fstat(self.log_fd).st_size
        self.manifest_size = _whole_lines_length(self.manifest_fd)

    def close(self) -> None:
        os.close(self.log_fd)
        os.close(self.manifest_fd)


@dataclass(slots=True)
class DayAppend:
    """What one group added to one day's files: enough to land it, or to cut it away."""

    files: DayFiles
    log_before: int
    manifest_before: int
    lines: bytes


# (each agent's next sequence number, how far into each day's manifest that reaches)
Snapshot = tuple[dict[str, int], dict[str, int]]


def load_sequences(root: Path) -> Snapshot:
    """The snapshot, brought up to date with the manifest lines written after it."""
    snapshot = _read_snapshot(root / SEQUENCES_FILE)
    following, covered = snapshot if snapshot else ({}, {})
    manifests = day_manifests(root)
    for manifest in manifests:
        if covered.get(manifest.stem, 0) > manifest.stat().st_size:
            log.warning("sequences_snapshot_ignored", reason=f"{manifest.name} is shorter")
            return _scan(manifests, {}, {})
    return _scan(manifests, following, covered)


def _scan(manifests: list[Path], following: dict[str, int], covered: dict[str, int]) -> Snapshot:
    for manifest in manifests:
        day = manifest.stem
        for entry, end in manifest_entries(manifest, covered.get(day, 0)):
            following[entry.agent] = max(following.get(entry.agent, 1), entry.sequence + 1)
            covered[day] = end
    return following, covered


def _read_snapshot(path: Path) -> Snapshot | None:
    try:
        raw = json.loads(path.read_bytes())
        following = {str(k): int(v) for k, v in raw["next"].items()}
        covered = {str(k): int(v) for k, v in raw["manifests"].items()}
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("sequences_snapshot_ignored", reason=f"unreadable: {exc}")
        return None
    return following, covered


def write_snapshot(root: Path, snapshot: Snapshot) -> None:
    """Replace ``sequences.json`` whole, owner-only: the old one or the new one, never
    half. A rename lost to a crash leaves the older snapshot, which covers less: the
    restart reads more manifest lines, nothing else."""
    following, covered = snapshot
    write_private(
        root / SEQUENCES_FILE, json.dumps({"manifests": covered, "next": following}).encode()
    )


Waiting = tuple[Batch, "asyncio.Future[ManifestEntry]"]


class Sink:
    """The day's files, each agent's next sequence number, and the group committer."""

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
        private_dir(self.root)
        self._next, self._covered = load_sequences(self.root)
        self._locks: dict[str, asyncio.Lock] = {}
        self._open: dict[str, DayFiles] = {}
        self._days: dict[int, str] = {}
        self._broken: OSError | None = None
        self.observer_failures = failures = failures or ObserverFailures()
        self._on_landed = failures.guarded("landed", [(name_of(on_landed), on_landed)])
        self._on_commit = failures.guarded("commit", [(name_of(on_commit), on_commit)])
        self._waiting: list[Waiting] = []
        self._wake = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._closing = False

    def lock(self, agent_id: str) -> asyncio.Lock:
        """Held across check, ask and write: one agent's batches land one at a time."""
        lock = self._locks.get(agent_id)
        if lock is None:
            lock = self._locks[agent_id] = asyncio.Lock()
        return lock

    def next_sequence(self, agent_id: str) -> int:
        return self._next.get(agent_id, 1)

    # ------------------------------------------------------------ writing

    def write_group(self, batches: Sequence[Batch]) -> list[ManifestEntry]:
        """Land every batch, durably, or raise (then none of them is acknowledged).

        Blocking, for tools and tests; the gateway's committer does the same in two
        steps (the records on the loop, the syncs and the lines in a thread).
        """
        entries, appends = self._append_records(batches)
        self._land(appends)
        self._advance(batches)
        return entries

    def _append_records(
        self, batches: Sequence[Batch]
    ) -> tuple[list[ManifestEntry], list[DayAppend]]:
        """Every record at the end of its day's log, in one write per day (page cache
        only); the manifest lines that will describe them, not yet written."""
        if self._broken is not None:
            stopped = f"the sink stopped (a failed group could not be cut: {self._broken})"
            raise OSError(self._broken.errno, stopped)
        by_day: dict[str, list[int]] = {}  # usually one day; two around midnight
        for index, batch in enumerate(batches):
            by_day.setdefault(self._day(batch.received_at), []).append(index)
        entries: list[ManifestEntry | None] = [None] * len(batches)
        appends: list[DayAppend] = []
        try:
            for day, indexes in by_day.items():
                files = self._files(day)
                records, lines, offset = [], [], files.log_size
                for index in indexes:
                    batch = batches[index]
                    framed = LENGTH.pack(len(batch.record)) + batch.record
                    entry = ManifestEntry(
                        batch.agent_id,
                        batch.sequence,
                        offset,
                        len(framed),
                        hashlib.sha256(batch.record).hexdigest(),
                        batch.events,
                        batch.first_event_at,
                        batch.last_event_at,
                        batch.received_at,
                    )
                    entries[index] = entry
                    records.append(framed)
                    lines.append(manifest_line(entry))
                    offset += len(framed)
                append = DayAppend(files, files.log_size, files.manifest_size, b"".join(lines))
                appends.append(append)
                _write_all(files.log_fd, b"".join(records))
                files.log_size = offset
        except OSError:
            self._cut(appends)
            raise
        return [entry for entry in entries if entry is not None], appends

    def _land(self, appends: Sequence[DayAppend]) -> None:
        """Log synced, then the lines written and synced: a line never points at a record
        that is not durable. Runs in a thread, while the loop takes the next uploads."""
        try:
            for append in appends:
                files = append.files
                _sync_data(files.log_fd)
                if files.unsynced_entry:
                    sync_directory(self.root)
                    files.unsynced_entry = False
                _write_all(files.manifest_fd, append.lines)
                files.manifest_size = append.manifest_before + len(append.lines)
                _sync_data(files.manifest_fd)
        except OSError:
            self._cut(appends)
            raise

    def _cut(self, appends: Sequence[DayAppend]) -> None:
        """Both files back to where the failed group started; if that fails too, stop."""
        for append in appends:
            files = append.files
            try:
                os.ftruncate(files.manifest_fd, append.manifest_before)
                files.manifest_size = append.manifest_before
                os.ftruncate(files.log_fd, append.log_before)
                files.log_size = append.log_before
            except OSError as exc:
                self._broken = exc
                log.error("sink_stopped", day=files.day, error=str(exc))

    def _advance(self, batches: Sequence[Batch]) -> None:
        """After a group landed: the numbers move on, and days past go shut."""
        for batch in batches:
            self._next[batch.agent_id] = batch.sequence + 1
        for day, files in self._open.items():
            self._covered[day] = files.manifest_size
        # Yesterday's files stay open past midnight; older ones close here, between
        # groups, never while a group still holds their descriptors.
        for older in sorted(self._open)[:-2]:
            self._open.pop(older).close()

    def _files(self, day: str) -> DayFiles:
        files = self._open.get(day)
        if files is None:
            files = self._open[day] = DayFiles(self.root, day)
        return files

    def _day(self, at: float) -> str:
        """YYYY-MM-DD (UTC), remembered per day: computed once, not once per batch."""
        key = int(at // 86_400)
        day = self._days.get(key)
        if day is None:
            day = self._days[key] = day_of(at)
        return day

    def _snapshot(self) -> Snapshot:
        """Copied on the loop between groups (every number in it is durable), written in
        a thread."""
        return dict(self._next), dict(self._covered)

    # ------------------------------------------------------------ the committer

    def start(self) -> None:
        """Start the committer; ``append`` needs it."""
        self._committer = asyncio.create_task(
            self._commit_forever(), name=f"sink-commit-{self.root.name}"
        )

    async def close(self) -> None:
        """Land what is queued, leave a snapshot of the sequences, close the files."""
        if self._committer is not None:
            self._closing = True
            self._wake.set()
            await self._committer
            self._committer = None
            if self._broken is None:
                await self._write_snapshot()
        for files in self._open.values():
            files.close()
        self._open.clear()

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
        """One group at a time; whatever arrives during a commit forms the next group."""
        last_started = -math.inf
        last_snapshot = time.monotonic()
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
                    entries, appends = self._append_records(batches)
                    await asyncio.to_thread(self._land, appends)
                except OSError as exc:
                    _settle(group, exc)
                    continue
                self._advance(batches)
                self._on_commit(time.monotonic() - last_started, len(group))
                for batch in batches:
                    self._on_landed(batch)
                _settle(group, entries)
                if last_started - last_snapshot >= SNAPSHOT_INTERVAL_SECONDS:
                    last_snapshot = last_started
                    await self._write_snapshot()
            if self._closing:
                return

    async def _write_snapshot(self) -> None:
        try:
            await asyncio.to_thread(write_snapshot, self.root, self._snapshot())
        except KillswitchError as exc:  # the files stay the truth; a restart reads more
            log.warning("sequences_snapshot_failed", error=str(exc))


def _settle(group: list[Waiting], outcome: list[ManifestEntry] | OSError) -> None:
    """Answer the uploads still waiting."""
    for index, (_, future) in enumerate(group):
        if future.done():
            continue
        if isinstance(outcome, OSError):
            future.set_exception(outcome)
        else:
            future.set_result(outcome[index])
