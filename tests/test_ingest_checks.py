"""The ingest gateway's own checks, its verdict cache, its sink, and the plane's batched
verdicts (``control/ingest_checks.py``): each rule on its own, with the input a hostile
agent or a broken component would send."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc
from structlog.testing import capture_logs

from agent_stub.upload import UPLOAD_TIMEOUT_SECONDS
from control.domain import ComplianceState
from control.domain import Mode
from control.domain import Scope
from control.domain.compliance import UPLOAD_IN_FLIGHT_GRACE_SECONDS
from control.errors import InvalidInput
from control.ingest.checks import MAX_BATCH_BYTES
from control.ingest.checks import MAX_EVENTS_PER_BATCH
from control.ingest.checks import MAX_SKEW_ALLOWANCE
from control.ingest.checks import BatchShape
from control.ingest.checks import Refusal
from control.ingest.checks import after_stop_refusal
from control.ingest.checks import check_shape
from control.ingest.checks import sequence_refusal
from control.ingest.checks import skew_allowance
from control.ingest.control_client import CONTROL_DEADLINE_SECONDS
from control.ingest.control_client import ControlClient
from control.ingest.control_client import ControlUnreachable
from control.ingest.gateway import measure
from control.ingest.watch import CAPTURE_SLACK_SECONDS
from control.ingest.watch import FRESH_SECONDS
from control.ingest.watch import StandingCopy
from control.ingest_checks import MAX_CHECKS_PER_CALL
from control.ingest_checks import RESYNC_SECONDS
from control.ingest_checks import Accepted
from control.ingest_checks import Check
from control.ingest_checks import UploadWatch
from control.ingest_checks import authorize_batches
from control.ingest_checks import record_accepted as plane_record_accepted
from control.plane import ControlPlane
from tests.conftest import free_port
from tests.fake_clock import FakeClock
from tests.plane_support import IC
from tests.plane_support import REPORT
from tests.plane_support import STOPPED
from tests.plane_support import RecordingStore
from tests.plane_support import connect_agent
from tests.plane_support import run_plane
from tests.plane_support import started

NOW = 1_000_000.0


def shape(
    *captured: float, sequence: int = 1, payload: int = 10, sent_at: float = NOW
) -> BatchShape:
    first, last = (min(captured), max(captured)) if captured else (0.0, 0.0)
    return BatchShape("laptop", sequence, len(captured), first, last, payload, sent_at)


# ---------------------------------------------------------------- shape, size, clock


def test_a_batch_dated_in_the_future_is_refused_beyond_the_measured_skew() -> None:
    assert check_shape(shape(NOW - 5, NOW + 1.5), NOW) == pytest.approx(2.0)
    with pytest.raises(Refusal, match=r"event dated 3\.0 s in the future") as refused:
        check_shape(shape(NOW - 5, NOW + 3), NOW)
    assert refused.value.code == "INVALID_ARGUMENT"
    # An agent whose clock runs 4 s ahead (it says so in sent_at) gets 6 s of allowance.
    assert check_shape(shape(NOW + 5, sent_at=NOW + 4), NOW) == pytest.approx(6.0)


def test_a_claimed_skew_never_buys_more_than_the_cap() -> None:
    assert skew_allowance(NOW + 3600, NOW) == MAX_SKEW_ALLOWANCE
    with pytest.raises(Refusal, match="in the future"):
        check_shape(shape(NOW + 60, sent_at=NOW + 3600), NOW)


@pytest.mark.parametrize(
    ("batch", "code", "words"),
    [
        (shape(), "INVALID_ARGUMENT", "empty batch"),
        (shape(NOW, sequence=0), "INVALID_ARGUMENT", "start at 1"),
        (shape(*[NOW] * (MAX_EVENTS_PER_BATCH + 1)), "RESOURCE_EXHAUSTED", "events: at most"),
        (shape(NOW, payload=MAX_BATCH_BYTES + 1), "RESOURCE_EXHAUSTED", "bytes: at most"),
        (shape(0.0, NOW), "INVALID_ARGUMENT", "capture time"),
        (shape(NOW, sent_at=0.0), "INVALID_ARGUMENT", "sent_at missing"),
    ],
    ids=["empty", "sequence-0", "too-many-events", "too-many-bytes", "undated", "no-sent-at"],
)
def test_malformed_and_oversized_batches_get_one_clear_line(
    batch: BatchShape, code: str, words: str
) -> None:
    with pytest.raises(Refusal, match=words) as refused:
        check_shape(batch, NOW)
    assert refused.value.code == code and "\n" not in refused.value.message


def test_only_the_next_sequence_number_is_accepted() -> None:
    assert sequence_refusal(5, 5) == ""
    assert "replay" in sequence_refusal(4, 5) and "up to 4" in sequence_refusal(4, 5)
    assert "skips ahead" in sequence_refusal(7, 5) and "is 5" in sequence_refusal(7, 5)


def test_events_after_the_stop_are_refused_beyond_the_allowance_only() -> None:
    stopped = NOW - 100
    assert after_stop_refusal(stopped + 1.9, stopped, 2.0) == ""
    assert after_stop_refusal(NOW, None, 2.0) == ""
    assert "100.0 s after the agent stopped" in after_stop_refusal(NOW, stopped, 2.0)


# ---------------------------------------------------------------- the standing copy


def test_the_standing_copy_lets_in_only_fresh_allowed_leased_and_not_later_than_it() -> None:
    copy = StandingCopy()
    assert not copy.allows("a", NOW, 0.0), "nothing heard yet"
    copy.apply(NOW, True, {"a": NOW + 60, "b": NOW + 0.5}, heard_at=100.0)
    assert copy.allows("a", NOW - 5, 100.0)
    assert copy.allows("a", NOW + CAPTURE_SLACK_SECONDS, 100.0)
    assert not copy.allows("a", NOW + CAPTURE_SLACK_SECONDS + 0.1, 100.0), (
        "captured after what the copy knows: a pause may have come meanwhile"
    )
    assert not copy.allows("unknown", NOW, 100.0)
    assert copy.allows("b", NOW, 100.4)
    assert not copy.allows("b", NOW, 100.5), "its lease ran out on the plane's clock"
    assert not copy.allows("a", NOW, 100.0 + FRESH_SECONDS + 0.01), "a silent copy is stale"
    # A change: "a" paused (no longer allowed); a heartbeat keeps the rest fresh.
    copy.apply(NOW + 1, False, {"a": None}, heard_at=101.0)
    assert not copy.allows("a", NOW, 101.0)
    copy.apply(NOW + 2, False, {}, heard_at=102.0)
    assert copy.allows("b", NOW, 101.0) is False  # its lease ended at NOW + 0.5
    copy.apply(NOW + 3, True, {"c": NOW + 60}, heard_at=103.0)
    assert (len(copy), copy.allows("c", NOW + 3, 103.0)) == (1, True), "a full copy replaces"
    copy.forget()
    assert not copy.allows("c", NOW + 3, 103.0), "the stream is gone"


# ---------------------------------------------------------------- the plane's side


async def paused_and_acked(
    tmp_path: Path, clock: FakeClock, store: RecordingStore | None = None
) -> tuple[ControlPlane, int]:
    """Agents a and b, leased; a fleet pause that a acked and b did not."""
    plane = await started(store or await RecordingStore.open(tmp_path), clock)
    connect_agent(plane, "a")
    connect_agent(plane, "b")
    assert plane.grant_lease("a").granted and plane.grant_lease("b").granted
    hold, _ = await plane.create_hold(Scope.fleet(), "leak", "", IC)
    plane.ack("a", hold.created_epoch, Mode.PAUSED, STOPPED, REPORT)
    return plane, hold.created_epoch


def test_the_plane_sends_every_allowed_agent_then_only_changes(tmp_path: Path) -> None:
    async def scenario(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        for agent in ("a", "b", "c"):
            connect_agent(plane, agent)
        assert plane.grant_lease("a").granted and plane.grant_lease("b").granted
        watch = UploadWatch(plane)
        as_of, full, first = watch.next_message()
        lease_a = plane.upload_allowances()["a"]
        assert (as_of, full, sorted(first)) == (1000.0, True, ["a", "b"]), "c holds no lease"
        assert watch.next_message() == (1000.0, False, {}), "nothing changed: a heartbeat"
        clock.now += 5
        assert plane.grant_lease("c").granted
        _, full, changes = watch.next_message()
        assert (full, list(changes)) == (False, ["c"])
        await plane.create_hold(Scope.fleet(), "leak", "", IC)
        _, _, changes = watch.next_message()
        assert changes == {"a": None, "b": None, "c": None}, "paused: allowed no more"
        assert lease_a > 1000.0

    run_plane(tmp_path, scenario)


def test_the_watch_resyncs_the_whole_fleet_and_names_a_change_the_edges_missed(
    tmp_path: Path,
) -> None:
    """A change no edge announced (here: a status replaced behind the plane's back) is
    sent at the next resync and logged; a lease that just ran out is no miss."""

    async def scenario(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        for agent in ("a", "b"):
            connect_agent(plane, agent)
            assert plane.grant_lease(agent).granted
        watch = UploadWatch(plane)
        _, full, first = watch.next_message()
        assert full and sorted(first) == ["a", "b"]
        view = plane.agent_view("a")
        assert view is not None
        view.status.lease_expires_at = None  # no edge: the plane was not told
        with capture_logs() as logs:
            assert watch.next_message() == (1000.0, False, {}), "the edges saw nothing"
            clock.now += RESYNC_SECONDS
            _, _, changes = watch.next_message()
        assert changes == {"a": None}
        assert [e["event"] for e in logs] == ["upload_watch_missed_change"]
        clock.now += plane.lease_ttl  # b's lease runs out: the gateway knows its end
        with capture_logs() as logs:
            assert watch.next_message() == (clock.now, False, {})
        assert not logs
        watch.close()

    run_plane(tmp_path, scenario)


def test_batched_verdicts_give_the_stop_time_and_refuse_paused_agents(tmp_path: Path) -> None:
    async def scenario(plane: ControlPlane, store: RecordingStore, clock: FakeClock) -> None:
        connect_agent(plane, "a")
        plane.grant_lease("a")
        (allowed, ghost) = authorize_batches(
            plane, [Check("a", 1, 990.0, 999.0, 5), Check("ghost", 1, 990.0, 999.0, 5)]
        )
        assert allowed.allowed and allowed.stopped_at is None
        assert allowed.lease_expires_at is not None and allowed.lease_expires_at > clock.now
        assert not ghost.allowed and "unknown agent" in ghost.reason
        hold, _ = await plane.create_hold(Scope.fleet(), "leak", "", IC)
        plane.ack("a", hold.created_epoch, Mode.PAUSED, STOPPED, REPORT)
        clock.now += 1
        (paused,) = authorize_batches(plane, [Check("a", 2, 995.0, 999.5, 3)])
        assert not paused.allowed and "paused" in paused.reason
        assert (paused.stopped_at, paused.epoch) == (1000.0, hold.created_epoch)
        assert not paused.keep_spool, "a hold that purges: refused data is dropped"
        view = plane.agent_view("a")
        assert view is not None and view.status.uploads_refused == 1
        with pytest.raises(InvalidInput, match="at most"):
            authorize_batches(plane, [Check("a", 3, 1.0, 2.0, 1)] * (MAX_CHECKS_PER_CALL + 1))

    run_plane(tmp_path, scenario)


def test_an_honest_upload_in_flight_at_the_pause_ends_within_the_plane_s_grace() -> None:
    """Past the grace, an upload after a pause ack is a violation: an honest agent's
    batch started just before its ack must be decided (its deadline, then the gateway's
    to the control plane) well within it, or honest agents would be flagged."""
    assert UPLOAD_TIMEOUT_SECONDS + CONTROL_DEADLINE_SECONDS < UPLOAD_IN_FLIGHT_GRACE_SECONDS


def test_a_gateway_refusal_is_durable_violation_evidence(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        plane, _ = await paused_and_acked(tmp_path, clock)
        clock.now += 30
        # Within the plane's own 2 s allowance, only the gateway (with the agent's
        # measured skew) can tell: its report is the evidence.
        (verdict,) = authorize_batches(
            plane, [Check("a", 7, 1000.5, 1001.5, 4, refused_by_gateway="after the stop")]
        )
        assert not verdict.allowed and "after the stop" in verdict.reason
        view = plane.agent_view("a")
        assert view is not None and view.compliance.state is ComplianceState.VIOLATION
        assert "refused batch 7 of 4 events" in view.status.violation
        await plane.stop()  # flushes: the evidence is in the store
        store = await RecordingStore.open(tmp_path)
        shared = await store.load_shared()
        assert [e.agent_id for e in shared.violations] == ["a"]
        assert "batch 7" in shared.violations[0].evidence
        await store.close()

    asyncio.run(scenario())


def test_a_report_sent_again_is_not_counted_twice(tmp_path: Path) -> None:
    """The gateway sends a report again when its call timed out, even if the plane had
    already taken it: events after the stop must not double. A sink started anew
    (numbers from 1 again, newer capture times) still counts."""

    async def scenario() -> None:
        clock = FakeClock()
        plane, _ = await paused_and_acked(tmp_path, clock)
        first = [Accepted("a", 5, 4, 1010.0), Accepted("a", 6, 3, 1020.0)]
        plane_record_accepted(plane, first)
        plane_record_accepted(plane, first)  # the same call again, after a timeout
        plane_record_accepted(plane, [Accepted("a", 7, 2, 1030.0)])
        plane_record_accepted(plane, [Accepted("a", 1, 1, 1040.0)])  # a new sink
        view = plane.agent_view("a")
        assert view is not None
        assert view.status.events_accepted_after_pause == 4 + 3 + 2 + 1
        await plane.stop()

    asyncio.run(scenario())


def test_accepted_batches_give_per_laptop_figures_and_flag_data_landed_after_the_stop(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        plane, _ = await paused_and_acked(tmp_path, clock)
        clock.now += 30
        plane_record_accepted(
            plane,
            [Accepted("b", 1, 10, 999.0), Accepted("a", 1, 6, 990.0), Accepted("a", 2, 4, 1020.0)],
        )
        a, b = plane.agent_view("a"), plane.agent_view("b")
        assert a is not None and b is not None
        assert (a.status.events_accepted_after_pause, a.status.last_accepted_event_at) == (
            4,
            1020.0,
        )
        assert a.compliance.state is ComplianceState.VIOLATION
        assert "accepted batch 2 of 4 events" in a.status.violation
        # b never acked its pause: it has no stop time, so nothing it uploads is "after".
        assert (b.status.events_accepted_after_pause, b.status.last_accepted_event_at) == (
            0,
            999.0,
        )
        await plane.stop()  # flushes: every replica reads the figures from the row
        store = await RecordingStore.open(tmp_path)
        stored = await store.load_agent("a")
        await store.close()
        assert stored is not None
        assert (
            stored.status.events_accepted_after_pause,
            stored.status.last_accepted_event_at,
        ) == (
            4,
            1020.0,
        )

    asyncio.run(scenario())


def test_a_batch_that_only_moves_a_figure_writes_no_row_of_its_own(tmp_path: Path) -> None:
    """At 10k agents a row per accepted batch was most of the plane's work in a burst:
    the last accepted capture time is written with the agent's next row, at the
    liveness cadence, and at stop; events after the stop are written at once."""

    async def scenario() -> None:
        clock = FakeClock()
        store = await RecordingStore.open(tmp_path)
        plane, _ = await paused_and_acked(tmp_path, clock, store)
        await plane.flush()
        writes = len(store.batches)

        clock.now += 1
        plane_record_accepted(plane, [Accepted("b", 1, 10, 999.0)])
        await plane.flush()
        assert len(store.batches) == writes, "a figure alone waits for the cadence"

        clock.now += plane.last_seen_save_interval
        plane_record_accepted(plane, [Accepted("b", 2, 10, 1050.0)])
        await plane.flush()
        assert store.agents["b"].status.last_accepted_event_at == 1050.0

        clock.now += 1
        plane_record_accepted(plane, [Accepted("a", 1, 3, 1070.0), Accepted("b", 3, 1, 1060.0)])
        await plane.flush()  # a's events after its stop: at once; b's figure: later
        assert store.agents["a"].status.events_accepted_after_pause == 3
        assert store.agents["b"].status.last_accepted_event_at == 1050.0
        await plane.stop()
        assert store.agents["b"].status.last_accepted_event_at == 1060.0

    asyncio.run(scenario())


# ---------------------------------------------------------------- the gateway's control client


class CountingIngest(pb_grpc.IngestServicer):
    """A control plane that allows everything and counts its calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    async def AuthorizeBatches(  # noqa: N802
        self, request: pb.AuthorizeBatchesRequest, context: object
    ) -> pb.AuthorizeBatchesResponse:
        self.calls.append(len(request.checks))
        return pb.AuthorizeBatchesResponse(
            verdicts=[pb.BatchVerdict(allowed=True, reason="ok", epoch=1)] * len(request.checks),
            epoch=1,
        )


def test_concurrent_checks_share_one_call_and_no_answer_refuses_them_all() -> None:
    async def scenario() -> None:
        ingest = CountingIngest()  # type: ignore[abstract]  # only AuthorizeBatches is asked
        server = grpc.aio.server()
        pb_grpc.add_IngestServicer_to_server(ingest, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        dead = f"127.0.0.1:{free_port()}"
        client = ControlClient([dead, f"127.0.0.1:{port}"], None)
        checks = [pb.BatchCheck(agent_id=f"a{i}", sequence=1) for i in range(300)]
        verdicts = await asyncio.gather(*(client.decide(c) for c in checks))
        assert all(v.allowed for v in verdicts)
        assert sum(ingest.calls) == 300 and len(ingest.calls) <= 3, ingest.calls
        await server.stop(None)
        started = time.monotonic()
        refused = await asyncio.gather(
            *(client.decide(c) for c in checks[:5]), return_exceptions=True
        )
        assert all(isinstance(r, ControlUnreachable) for r in refused), refused
        assert time.monotonic() - started < 2 * CONTROL_DEADLINE_SECONDS + 1
        await client.close()

    asyncio.run(scenario())


def _batch(times: list[int], events: int) -> pb.UploadBatchRequest:
    return pb.UploadBatchRequest(
        events=[pb.CaptureEvent(payload=b"ab") for _ in range(events)],
        captured_at_unix_nano=times,
    )


def _measured(raw: bytes) -> tuple[int, float, float]:
    """``measure`` as the gateway calls it: the bytes, and what they parse as."""
    return measure(raw, pb.UploadBatchRequest.FromString(raw))


def test_a_batch_is_measured_by_its_time_column_and_needs_one_time_per_event() -> None:
    def measured(times: list[int], events: int) -> tuple[int, float, float]:
        return _measured(_batch(times, events).SerializeToString())

    assert measured([100_500_000_000, 99_000_000_000, 101_250_000_000], 3) == (3, 99.0, 101.25)
    assert measured([], 0) == (0, 0.0, 0.0)
    with pytest.raises(InvalidInput, match="2 capture times for 3 events: one per event"):
        measured([1, 2], 3)
    with pytest.raises(InvalidInput, match="4 capture times for 3 events"):
        measured([1, 2, 3, 4], 3)


@given(st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=1, max_size=600))
def test_the_column_read_finds_the_same_first_and_last_time_as_python(times: list[int]) -> None:
    """Every u64, up to the top bit (numpy's unsigned words, not signed ones)."""
    raw = _batch(times, len(times)).SerializeToString()
    assert _measured(raw) == (len(times), min(times) / 1e9, max(times) / 1e9)


def test_times_split_into_runs_or_unpacked_are_refused_so_none_goes_unchecked() -> None:
    """A modified agent hides a late time in an earlier run of field 5: the column read
    sees only the last run, so the batch is refused rather than measured on part of it."""
    late, early = 2_000_000_000_000_000_000, 1_000_000_000_000_000_000
    split = (
        _batch([late], 3).SerializeToString()
        + pb.UploadBatchRequest(captured_at_unix_nano=[early, early]).SerializeToString()
    )
    assert list(pb.UploadBatchRequest.FromString(split).captured_at_unix_nano) == [
        late,
        early,
        early,
    ]
    with pytest.raises(InvalidInput, match="one packed column"):
        _measured(split)
    # Field 5 with wire type 1 (one fixed64 each, unpacked): legal, and refused alike.
    unpacked_late = bytes([5 << 3 | 1]) + late.to_bytes(8, "little")
    mixed = _batch([early, early], 3).SerializeToString() + unpacked_late
    assert len(pb.UploadBatchRequest.FromString(mixed).captured_at_unix_nano) == 3
    with pytest.raises(InvalidInput, match="one packed column"):
        _measured(mixed)
