"""The gateway's sink (``control/ingest/sink.py``, ``sink_format.py``): private,
checksummed, append-only day files, landed by group commit. Each test breaks one
promise: a record lost or acknowledged before it is durable, a manifest line pointing at
nothing, a sequence number reopened, a failed group left half on disk."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control.errors import InvalidInput
from control.errors import KillswitchError
from control.ingest import sink as sink_module
from control.ingest.gateway import GatewayConfig
from control.ingest.gateway import serve_gateway
from control.ingest.sink import SEQUENCES_FILE
from control.ingest.sink import Sink
from control.ingest.sink import load_sequences
from control.ingest.sink_format import QUARANTINE_DIR
from control.ingest.sink_format import Batch
from control.ingest.sink_format import ManifestEntry
from control.ingest.sink_format import check_agent_id
from control.ingest.sink_format import claim_data_dir
from control.ingest.sink_format import day_manifests
from control.ingest.sink_format import manifest_entries
from control.ingest.sink_format import manifest_line
from control.ingest.sink_format import verified_records
from tests.disks import fill
from tests.disks import mount_tmpfs
from tests.disks import mounted

NOW = 1_000_000.0  # 1970-01-12
DAY = "1970-01-12"


def batch(agent: str, sequence: int, record: bytes, at: float = NOW) -> Batch:
    return Batch(agent, sequence, record, 1, at, at, at)


def write(sink: Sink, agent: str, sequence: int, record: bytes, at: float = NOW) -> None:
    sink.write_group([batch(agent, sequence, record, at)])


def exported(data_dir: Path, agent: str | None) -> list[tuple[str, int, bytes]]:
    return [(e.agent, e.sequence, raw) for e, raw in verified_records(data_dir, agent)]


def test_the_sink_is_private_checksummed_and_remembers_sequences(tmp_path: Path) -> None:
    sink = Sink(tmp_path)
    assert sink.next_sequence("laptop") == 1
    write(sink, "laptop", 1, b"first")
    write(sink, "laptop", 2, b"second", at=NOW + 86_400)  # the next day: new files
    # A restarted gateway reads where it was from the manifests: no replay reopens.
    assert Sink(tmp_path).next_sequence("laptop") == 3
    assert exported(tmp_path, "laptop") == [("laptop", 1, b"first"), ("laptop", 2, b"second")]
    assert [m.name for m in day_manifests(tmp_path / "sink")] == [
        f"{DAY}.manifest",
        "1970-01-13.manifest",
    ]
    ((entry, _),) = manifest_entries(tmp_path / "sink" / f"{DAY}.manifest")
    assert entry.sha256 == hashlib.sha256(b"first").hexdigest()
    for path in (tmp_path / "sink").rglob("*"):
        expected = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    assert stat.S_IMODE((tmp_path / "sink").stat().st_mode) == 0o700


def test_a_group_lands_every_agents_batches_in_one_log_with_their_own_offsets(
    tmp_path: Path,
) -> None:
    sink = Sink(tmp_path)
    group = [batch(f"laptop-{i % 3}", i // 3 + 1, f"record {i}".encode()) for i in range(9)]
    entries = sink.write_group(group)
    assert [(e.agent, e.sequence) for e in entries] == [(b.agent_id, b.sequence) for b in group]
    assert len({e.offset for e in entries}) == 9
    for agent in ("laptop-0", "laptop-1", "laptop-2"):
        expected = [(b.agent_id, b.sequence, b.record) for b in group if b.agent_id == agent]
        assert exported(tmp_path, agent) == expected
    assert len(exported(tmp_path, None)) == 9
    assert sorted(f.name for f in (tmp_path / "sink").iterdir()) == [
        f"{DAY}.log",
        f"{DAY}.manifest",
    ]


def test_a_group_spanning_days_lands_in_each_and_only_two_days_stay_open(
    tmp_path: Path,
) -> None:
    """Four days in one group (a clock that jumped): no day's files are closed while the
    group still writes to them; after it, only the newest two stay open."""
    sink = Sink(tmp_path)
    days = [NOW + 86_400 * n for n in range(4)]
    sink.write_group([batch(f"agent-{n}", 1, b"day %d" % n, at) for n, at in enumerate(days)])
    for n in range(4):
        day = f"1970-01-{12 + n}"
        assert [e.agent for e, _ in verified_records(tmp_path, None, day=day)] == [f"agent-{n}"]
    assert sorted(sink._open) == ["1970-01-14", "1970-01-15"]
    write(sink, "agent-0", 2, b"back on the first day", at=NOW)  # reopened, appended
    assert [e.sequence for e, _ in verified_records(tmp_path, "agent-0")] == [1, 2]


def test_the_log_is_durable_before_any_line_points_into_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order that makes every manifest line trustworthy after a crash: records
    written, log synced, lines written, manifest synced."""
    sink = Sink(tmp_path)
    write(sink, "laptop", 1, b"opens the day's files")
    files = sink._open[DAY]
    names = {files.log_fd: "log", files.manifest_fd: "manifest"}
    calls: list[str] = []
    real_write, real_sync = sink_module._write_all, sink_module._sync_data

    def traced_write(fd: int, data: bytes) -> None:
        calls.append(f"write {names[fd]}")
        real_write(fd, data)

    def traced_sync(fd: int) -> None:
        calls.append(f"sync {names[fd]}")
        real_sync(fd)

    monkeypatch.setattr(sink_module, "_write_all", traced_write)
    monkeypatch.setattr(sink_module, "_sync_data", traced_sync)
    sink.write_group([batch("laptop", 2, b"x"), batch("other", 1, b"y")])
    assert calls == ["write log", "sync log", "write manifest", "sync manifest"]


@pytest.mark.parametrize("failing", ["sync log", "write manifest", "sync manifest"])
def test_a_failed_group_is_cut_from_both_files_and_its_numbers_stay_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    sink = Sink(tmp_path)
    write(sink, "laptop", 1, b"first")
    files = sink._open[DAY]
    sizes = (files.log_size, files.manifest_size)
    names = {files.log_fd: "log", files.manifest_fd: "manifest"}
    real_write, real_sync = sink_module._write_all, sink_module._sync_data

    def fail_at(step: str, real: object, fd: int, *data: bytes) -> None:
        if step == failing:
            if data:  # half the lines reached the file before the disk filled
                real_write(fd, data[0][: len(data[0]) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, *data)  # type: ignore[operator]

    monkeypatch.setattr(
        sink_module, "_write_all", lambda fd, d: fail_at(f"write {names[fd]}", real_write, fd, d)
    )
    monkeypatch.setattr(
        sink_module, "_sync_data", lambda fd: fail_at(f"sync {names[fd]}", real_sync, fd)
    )
    with pytest.raises(OSError, match="No space left"):
        sink.write_group([batch("laptop", 2, b"second"), batch("other", 1, b"x")])
    assert (os.fstat(files.log_fd).st_size, os.fstat(files.manifest_fd).st_size) == sizes
    assert (sink.next_sequence("laptop"), sink.next_sequence("other")) == (2, 1)
    monkeypatch.undo()
    write(sink, "laptop", 2, b"second, again")  # the retry lands under its own number
    assert exported(tmp_path, None) == [("laptop", 1, b"first"), ("laptop", 2, b"second, again")]
    assert Sink(tmp_path).next_sequence("laptop") == 3


def test_a_group_that_cannot_be_cut_stops_the_sink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed: with the files in a state it cannot account for, the sink takes
    nothing more until a restart reads them afresh."""
    sink = Sink(tmp_path)
    write(sink, "laptop", 1, b"first")

    def io_error(*args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sink_module, "_sync_data", io_error)
    monkeypatch.setattr(os, "ftruncate", io_error)
    with pytest.raises(OSError, match="Input/output"):
        write(sink, "laptop", 2, b"second")
    monkeypatch.undo()
    with pytest.raises(OSError, match="the sink stopped"):
        write(sink, "laptop", 2, b"second")
    assert Sink(tmp_path).next_sequence("laptop") in (2, 3)  # what the disk holds


def test_a_crash_leaves_only_what_nobody_was_told_was_kept(tmp_path: Path) -> None:
    """After a crash: record bytes no line points at (the log was written, the lines
    were not) and a torn last line. Neither was acknowledged: the export never shows
    them, the torn line is cut before the next one, and the agents' retries land."""
    write(Sink(tmp_path), "laptop", 1, b"first")
    log, manifest = tmp_path / "sink" / f"{DAY}.log", tmp_path / "sink" / f"{DAY}.manifest"
    with log.open("ab") as orphan:
        orphan.write(b"\x00\x00\x00\x06second")
    with manifest.open("ab") as torn:
        torn.write(b'{"agent": "laptop", "sequence": 2, "off')
    assert exported(tmp_path, "laptop") == [("laptop", 1, b"first")]
    restarted = Sink(tmp_path)
    assert restarted.next_sequence("laptop") == 2
    write(restarted, "laptop", 2, b"second, again")
    assert exported(tmp_path, "laptop") == [
        ("laptop", 1, b"first"),
        ("laptop", 2, b"second, again"),
    ]
    assert Sink(tmp_path).next_sequence("laptop") == 3


def test_a_damaged_record_fails_its_checksum(tmp_path: Path) -> None:
    sink = Sink(tmp_path)
    write(sink, "laptop", 1, b"original")
    write(sink, "laptop", 2, b"newest")
    log = tmp_path / "sink" / f"{DAY}.log"
    log.write_bytes(log.read_bytes().replace(b"original", b"modified"))
    with pytest.raises(KillswitchError, match=r"laptop sequence 1 .* does not match its checksum"):
        exported(tmp_path, "laptop")


def test_an_export_names_one_agent_and_an_agent_without_data_is_an_error(tmp_path: Path) -> None:
    Sink(tmp_path).write_group([batch("laptop-1", 1, b"one"), batch("laptop-10", 1, b"ten")])
    assert exported(tmp_path, "laptop-1") == [("laptop-1", 1, b"one")]
    with pytest.raises(KillswitchError, match="no data for agent 'laptop-2'"):
        exported(tmp_path, "laptop-2")
    with pytest.raises(InvalidInput, match="expected YYYY-MM-DD"):
        list(verified_records(tmp_path, "laptop-1", day="yesterday"))


@pytest.mark.parametrize("agent", ["../escape", ".hidden", 'a"b', "a\nb", ""])
def test_an_agent_id_that_cannot_be_stored_is_refused(agent: str) -> None:
    with pytest.raises(InvalidInput, match="cannot be stored in the sink"):
        check_agent_id(agent)


def test_quarantine_is_a_sink_of_its_own(tmp_path: Path) -> None:
    Sink(tmp_path, QUARANTINE_DIR).write_group([batch("laptop", 5, b"refused")])
    assert Sink(tmp_path).next_sequence("laptop") == 1
    ((entry, raw),) = verified_records(tmp_path, "laptop", kind=QUARANTINE_DIR)
    assert (entry.sequence, raw) == (5, b"refused")


# ---------------------------------------------------------------- sequences on restart


def test_a_restart_reads_the_snapshot_and_only_the_lines_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def run_and_close() -> None:
        sink = Sink(tmp_path)
        sink.start()
        await asyncio.gather(*(sink.append(batch(f"a{i}", 1, b"x")) for i in range(50)))
        await sink.close()  # leaves sequences.json

    asyncio.run(run_and_close())
    covered = (tmp_path / "sink" / f"{DAY}.manifest").stat().st_size
    write(Sink(tmp_path), "a7", 2, b"after the snapshot")  # no snapshot written here
    starts: list[int] = []
    real = manifest_entries

    def traced(manifest: Path, start: int = 0, agent: str | None = None) -> object:
        starts.append(start)
        return real(manifest, start, agent)

    monkeypatch.setattr(sink_module, "manifest_entries", traced)
    restarted = Sink(tmp_path)
    assert starts == [covered], "read the day again from its start"
    assert restarted.next_sequence("a7") == 3
    assert restarted.next_sequence("a8") == 2
    assert restarted.next_sequence("never-seen") == 1


@pytest.mark.parametrize(
    "damage", ["not json", '{"next": {}}', '{"next": {}, "manifests": {"1970-01-12": 999999}}']
)
def test_a_snapshot_that_does_not_fit_the_files_is_ignored(tmp_path: Path, damage: str) -> None:
    Sink(tmp_path).write_group([batch("laptop", 1, b"x"), batch("laptop", 2, b"y")])
    (tmp_path / "sink" / SEQUENCES_FILE).write_text(damage)
    following, covered = load_sequences(tmp_path / "sink")
    assert following == {"laptop": 3}
    assert covered == {DAY: (tmp_path / "sink" / f"{DAY}.manifest").stat().st_size}


# ---------------------------------------------------------------- the committer


def test_concurrent_appends_share_commits_and_each_waits_for_its_own(tmp_path: Path) -> None:
    async def scenario() -> None:
        landed: list[Batch] = []
        groups: list[int] = []
        sink = Sink(
            tmp_path, on_landed=landed.append, on_commit=lambda seconds, size: groups.append(size)
        )
        sink.start()
        try:
            batches = [batch(f"laptop-{i:03d}", 1, f"r{i}".encode()) for i in range(300)]
            entries = await asyncio.gather(*(sink.append(b) for b in batches))
        finally:
            await sink.close()
        assert [e.agent for e in entries] == [b.agent_id for b in batches]
        assert sorted(b.agent_id for b in landed) == sorted(b.agent_id for b in batches)
        assert sum(groups) == 300
        assert len(groups) < 300, "every batch paid its own commit: no grouping"
        assert all(sink.next_sequence(b.agent_id) == 2 for b in batches)
        for b in batches:
            assert exported(tmp_path, b.agent_id) == [(b.agent_id, 1, b.record)]

    asyncio.run(scenario())


def test_a_batch_lands_and_is_reported_even_when_its_caller_stops_waiting(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        landed: list[Batch] = []
        sink = Sink(tmp_path, on_landed=landed.append)
        sink.start()
        try:
            waiting = asyncio.create_task(sink.append(batch("laptop", 1, b"kept")))
            await asyncio.sleep(0)
            waiting.cancel()
            await sink.close()  # drains the queue
        finally:
            await sink.close()
        assert [b.sequence for b in landed] == [1]
        assert sink.next_sequence("laptop") == 2, "a landed batch's number is never reopened"
        assert exported(tmp_path, "laptop") == [("laptop", 1, b"kept")]

    asyncio.run(scenario())


def test_observers_that_raise_stop_neither_the_committer_nor_the_uploads(tmp_path: Path) -> None:
    def broken(*args: object) -> None:
        raise ValueError("a bug in the reporting")

    async def scenario() -> None:
        sink = Sink(tmp_path, on_landed=broken, on_commit=broken)
        sink.start()
        try:
            for sequence in (1, 2, 3):  # one group each: the committer lived on
                await sink.append(batch("laptop", sequence, b"x%d" % sequence))
        finally:
            await sink.close()
        assert sink.next_sequence("laptop") == 4
        ((observer, failures),) = sink.observer_failures.counts.items()
        assert observer.endswith("<locals>.broken") and failures == 6

    asyncio.run(scenario())


def test_a_failed_commit_answers_every_waiter_and_the_retries_land(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        sink = Sink(tmp_path)
        write(sink, "laptop", 1, b"first")

        def disk_full(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(sink_module, "_sync_data", disk_full)
        sink.start()
        try:
            results = await asyncio.gather(
                sink.append(batch("laptop", 2, b"second")),
                sink.append(batch("other", 1, b"x")),
                return_exceptions=True,
            )
            assert all(isinstance(r, OSError) and r.errno == errno.ENOSPC for r in results)
            assert sink.next_sequence("laptop") == 2
            monkeypatch.undo()
            await sink.append(batch("laptop", 2, b"second"))
        finally:
            await sink.close()
        assert exported(tmp_path, "laptop") == [("laptop", 1, b"first"), ("laptop", 2, b"second")]

    asyncio.run(scenario())


_times = st.one_of(st.floats(), st.integers(min_value=0, max_value=2**62))
_counts = st.integers(min_value=0, max_value=2**62)


@given(
    st.one_of(st.text(max_size=20), st.from_regex(r"\A[a-z0-9][a-z0-9.@-]{0,20}\Z")),
    st.tuples(_counts, _counts, _counts, _counts),
    st.tuples(_times, _times, _times),
)
def test_a_manifest_line_is_what_json_dumps_writes(
    agent: str, counts: tuple[int, int, int, int], times: tuple[float, float, float]
) -> None:
    """The line is formatted by hand for speed; readers and tools parse it as JSON, with
    keys sorted: any difference from ``json.dumps`` (a float's digits, NaN, an id that
    needs escaping) would show."""
    sequence, offset, length, events = counts
    digest = hashlib.sha256(str(sequence).encode()).hexdigest()
    entry = ManifestEntry(agent, sequence, offset, length, digest, events, *times)
    fields = {name: getattr(entry, name) for name in sorted(ManifestEntry.__dataclass_fields__)}
    assert manifest_line(entry) == (json.dumps(fields) + "\n").encode()


def test_one_gateway_per_data_directory_and_the_claim_ends_with_its_holder(
    tmp_path: Path,
) -> None:
    first = claim_data_dir(tmp_path / "ingest")
    with pytest.raises(KillswitchError, match="is in use by another gateway"):
        claim_data_dir(tmp_path / "ingest")
    os.close(first)  # what the kernel does when the holding process ends, however
    os.close(claim_data_dir(tmp_path / "ingest"))


def test_a_gateway_that_fails_to_start_lets_go_of_its_data_directory(tmp_path: Path) -> None:
    """Its port is taken: the gateway stops with one line, and the directory is free for
    the next one started in the same process (the claim ends on every exit)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = GatewayConfig(tmp_path, f"127.0.0.1:{port}", ["127.0.0.1:1"], None, insecure=True)
        with pytest.raises(KillswitchError, match="cannot listen"):
            asyncio.run(serve_gateway(config))
    os.close(claim_data_dir(tmp_path))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MiB tmpfs, which a test fills (needs root)."""
    yield from mounted(mount_tmpfs, tmp_path / "disk")


def test_a_full_disk_fails_the_group_cleanly_and_the_retry_lands_once_space_returns(
    small_disk: Path,
) -> None:
    """A disk that fills under the sink: the group that cannot be written fails whole,
    what was already there is intact, and once space returns the retries land under the
    same numbers, each batch stored once, across a restart too."""
    sink = Sink(small_disk)
    write(sink, "laptop", 1, b"before the disk filled")
    fill(small_disk)
    big = os.urandom(256 * 1024)  # more than the few bytes dd may have left
    with pytest.raises(OSError) as failed:
        sink.write_group([batch("laptop", 2, big), batch("other", 1, big)])
    assert failed.value.errno == errno.ENOSPC
    assert (sink.next_sequence("laptop"), sink.next_sequence("other")) == (2, 1)
    assert exported(small_disk, None) == [("laptop", 1, b"before the disk filled")]
    (small_disk / "fill").unlink()
    sink.write_group([batch("laptop", 2, big), batch("other", 1, big)])
    restarted = Sink(small_disk)
    assert (restarted.next_sequence("laptop"), restarted.next_sequence("other")) == (3, 2)
    stored = [(agent, sequence) for agent, sequence, _ in exported(small_disk, None)]
    assert stored == [("laptop", 1), ("laptop", 2), ("other", 1)]
