"""The gateway's sink (``control/ingest/sink.py``): private, checksummed, append-only
files, landed by group commit. Each test breaks one promise: a record lost or
acknowledged before it is durable, a sequence number reopened, a path outside the sink."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import socket
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control.errors import InvalidInput
from control.errors import KillswitchError
from control.ingest import sink as sink_module
from control.ingest.gateway import GatewayConfig
from control.ingest.gateway import serve_gateway
from control.ingest.sink import Batch
from control.ingest.sink import ManifestEntry
from control.ingest.sink import Sink
from control.ingest.sink import claim_data_dir
from control.ingest.sink import manifest_line
from control.ingest.sink import read_manifest
from control.ingest.sink import verified_records

NOW = 1_000_000.0


def batch(agent: str, sequence: int, record: bytes, at: float = NOW) -> Batch:
    return Batch(agent, sequence, record, 1, at, at, at)


def write(sink: Sink, agent: str, sequence: int, record: bytes, at: float = NOW) -> None:
    sink.write_group([batch(agent, sequence, record, at)])


@pytest.fixture(params=["syncfs", "fsync"])
def sync_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of making a group durable: Linux's syncfs, and fsync per file elsewhere."""
    if request.param == "fsync":
        monkeypatch.setattr(sink_module, "SYNCFS", None)
    elif sink_module.SYNCFS is None:
        pytest.skip("no syncfs on this platform")
    return str(request.param)


def test_the_sink_is_private_checksummed_and_remembers_sequences(
    tmp_path: Path, sync_path: str
) -> None:
    sink = Sink(tmp_path)
    assert sink.next_sequence("laptop") == 1
    write(sink, "laptop", 1, b"first")
    write(sink, "laptop", 2, b"second", at=NOW + 86_400)  # the next day: a new file
    # A restarted gateway reads where it was from the manifests: no replay reopens.
    assert Sink(tmp_path).next_sequence("laptop") == 3
    got = [(e.sequence, raw) for e, raw in verified_records(tmp_path, "laptop")]
    assert got == [(1, b"first"), (2, b"second")]
    first_manifest = sorted((tmp_path / "sink" / "laptop").glob("*.manifest"))[0]
    (entry,) = read_manifest(first_manifest)
    assert entry.sha256 == hashlib.sha256(b"first").hexdigest()
    for path in (tmp_path / "sink").rglob("*"):
        expected = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    assert stat.S_IMODE((tmp_path / "sink").stat().st_mode) == 0o700


def test_a_group_lands_every_agents_batches_with_their_own_offsets(
    tmp_path: Path, sync_path: str
) -> None:
    sink = Sink(tmp_path)
    group = [batch(f"laptop-{i % 3}", i // 3 + 1, f"record {i}".encode()) for i in range(9)]
    entries = sink.write_group(group)
    assert [e.sequence for e in entries] == [b.sequence for b in group]
    for agent in ("laptop-0", "laptop-1", "laptop-2"):
        got = [(e.sequence, raw) for e, raw in verified_records(tmp_path, agent)]
        assert got == [(b.sequence, b.record) for b in group if b.agent_id == agent]


def test_a_sync_that_fails_fails_the_whole_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_gone(root: Path, files: object, new_dirs: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    sink = Sink(tmp_path)
    monkeypatch.setattr(sink_module, "make_durable", disk_gone)
    with pytest.raises(OSError, match="I/O error"):
        sink.write_group([batch("laptop", 1, b"lost?")])


def test_the_syncfs_path_reports_a_failing_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_syncfs(fd: int) -> int:
        return -1

    monkeypatch.setattr(sink_module, "SYNCFS", failing_syncfs)
    with pytest.raises(OSError, match="syncfs"):
        Sink(tmp_path).write_group([batch("laptop", 1, b"x")])


def test_a_damaged_confirmed_record_fails_its_checksum(tmp_path: Path) -> None:
    sink = Sink(tmp_path)
    write(sink, "laptop", 1, b"original")
    write(sink, "laptop", 2, b"newest")
    (log,) = (tmp_path / "sink" / "laptop").glob("*.log")
    log.write_bytes(log.read_bytes().replace(b"original", b"modified"))
    with pytest.raises(KillswitchError, match=r"sequence 1 .* does not match its checksum"):
        list(verified_records(tmp_path, "laptop"))


def test_a_crash_mid_commit_leaves_nothing_unconfirmed_behind(tmp_path: Path) -> None:
    """The group's manifest line reached the disk, its record did not (one sync a
    group: either may land first): batch 2 was never acknowledged. It is not exported,
    its number is open again, and the retry lands after a clean cut."""
    sink = Sink(tmp_path)
    write(sink, "laptop", 1, b"first")
    write(sink, "laptop", 2, b"second")
    agent = tmp_path / "sink" / "laptop"
    (log,) = agent.glob("*.log")
    (manifest,) = agent.glob("*.manifest")
    first_record_end = read_manifest(manifest)[0].offset + read_manifest(manifest)[0].length
    with log.open("r+b") as torn:  # the record's pages never written back
        torn.truncate(first_record_end)
        torn.truncate(first_record_end + 4 + len(b"second"))
    assert [e.sequence for e, _ in verified_records(tmp_path, "laptop")] == [1]
    restarted = Sink(tmp_path)
    assert restarted.next_sequence("laptop") == 2
    write(restarted, "laptop", 2, b"second, again")
    got = [(e.sequence, raw) for e, raw in verified_records(tmp_path, "laptop")]
    assert got == [(1, b"first"), (2, b"second, again")]


def test_a_torn_manifest_line_is_cut_before_the_next_line(tmp_path: Path) -> None:
    sink = Sink(tmp_path)
    write(sink, "laptop", 1, b"first")
    (manifest,) = (tmp_path / "sink" / "laptop").glob("*.manifest")
    with manifest.open("a") as torn:
        torn.write('{"sequence": 2, "off')  # a crash mid-line: never acknowledged
    restarted = Sink(tmp_path)
    assert restarted.next_sequence("laptop") == 2
    write(restarted, "laptop", 2, b"second")  # its line must not be glued to the torn one
    assert [e.sequence for e, _ in verified_records(tmp_path, "laptop")] == [1, 2]
    assert Sink(tmp_path).next_sequence("laptop") == 3


@pytest.mark.parametrize("agent", ["../escape", ".hidden", "a/b", ""])
def test_an_agent_id_never_names_a_path_outside_the_sink(tmp_path: Path, agent: str) -> None:
    with pytest.raises(InvalidInput, match="cannot name a sink directory"):
        Sink(tmp_path).agent_dir(agent)


# ---------------------------------------------------------------- the committer


def test_concurrent_appends_share_commits_and_each_waits_for_its_own(
    tmp_path: Path,
) -> None:
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
        assert [e.sequence for e in entries] == [1] * 300
        assert sorted(b.agent_id for b in landed) == sorted(b.agent_id for b in batches)
        assert sum(groups) == 300
        assert len(groups) < 300, "every batch paid its own commit: no grouping"
        assert all(sink.next_sequence(b.agent_id) == 2 for b in batches)
        for b in batches:
            ((_, raw),) = verified_records(tmp_path, b.agent_id)
            assert raw == b.record

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
        await asyncio.sleep(0)  # the settle callback runs on the loop
        assert [b.sequence for b in landed] == [1]
        assert sink.next_sequence("laptop") == 2, "a landed batch's number is never reopened"
        assert [raw for _, raw in verified_records(tmp_path, "laptop")] == [b"kept"]

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


def test_a_failed_commit_answers_every_waiter_and_rereads_sequences_from_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        sink = Sink(tmp_path)
        write(sink, "laptop", 1, b"first")
        assert sink.next_sequence("laptop") == 2

        def sync_fails(root: Path, files: object, new_dirs: object) -> None:
            """Records and lines written, the group's sync fails: unconfirmed."""
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(sink_module, "make_durable", sync_fails)
        sink.start()
        try:
            results = await asyncio.gather(
                sink.append(batch("laptop", 2, b"second")),
                sink.append(batch("other", 1, b"x")),
                return_exceptions=True,
            )
        finally:
            await sink.close()
        assert all(isinstance(r, OSError) and r.errno == errno.ENOSPC for r in results), results
        # Unconfirmed, its manifest line is on disk all the same: the number is read from
        # there again, so a retry of batch 2 is a replay, never a second copy under 2.
        monkeypatch.undo()
        assert sink.next_sequence("laptop") == 3
        assert [raw for _, raw in verified_records(tmp_path, "laptop")] == [b"first", b"second"]

    asyncio.run(scenario())


_times = st.one_of(st.floats(), st.integers(min_value=0, max_value=2**62))
_counts = st.integers(min_value=0, max_value=2**62)


@given(st.tuples(_counts, _counts, _counts, _counts), st.tuples(_times, _times, _times))
def test_a_manifest_line_is_what_json_dumps_writes(
    counts: tuple[int, int, int, int], times: tuple[float, float, float]
) -> None:
    """The line is formatted by hand for speed; readers and tools parse it as JSON, with
    keys sorted: any difference from ``json.dumps`` (a float's digits, NaN) would show."""
    sequence, offset, length, events = counts
    digest = hashlib.sha256(str(sequence).encode()).hexdigest()
    entry = ManifestEntry(sequence, offset, length, digest, events, *times)
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
