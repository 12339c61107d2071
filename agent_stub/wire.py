"""The agent's figures as ``killswitch.v1`` messages."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.timestamp_pb2 import Timestamp
from killswitch.v1 import killswitch_pb2 as pb

from agent_stub.capture import CaptureEngine


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def capture_report(engine: CaptureEngine) -> pb.CaptureReport:
    report = pb.CaptureReport(
        events_captured_total=engine.events_captured_total, spool_events=engine.spool_events
    )
    if engine.last_event_at is not None:
        report.last_event_at.CopyFrom(timestamp(engine.last_event_at))
    return report


def channel_states(active: Mapping[str, bool]) -> list[pb.Channel]:
    return [
        pb.Channel(name=name, state=pb.CHANNEL_STATE_ACTIVE if on else pb.CHANNEL_STATE_STOPPED)
        for name, on in active.items()
    ]
