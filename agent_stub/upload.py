"""Ships the spool to the ingest gateway (``--ingest``); a refused batch stays spooled.

An agent without a gateway uploads nothing: asking the control server whether it may
is the gateway's job now, and an agent can no longer authorize itself.
"""

from __future__ import annotations

import time

import grpc
import structlog
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from agent_stub.batches import MAX_EVENTS_PER_BATCH
from agent_stub.batches import UploadSequence
from agent_stub.batches import upload_request
from agent_stub.capture import CaptureEngine
from agent_stub.clock import Clock
from agent_stub.identity import Metadata
from agent_stub.witness import Witness

log = structlog.get_logger("killswitch.agent.upload")

UPLOAD_TIMEOUT_SECONDS = 10.0


class GatewayUploader:
    """Uploads the spool's oldest events, one numbered batch per round, to the gateway.

    The events are made at upload time from the spool's count and time range, so a
    simulated fleet keeps no event in memory. A batch leaves the spool only once the
    gateway accepted it; a refused or failed one is offered again next round (under
    a higher number if the gateway names one). Whether a round uploads at all is the
    agent's call: an honest one never does while paused or without a lease.
    """

    def __init__(
        self,
        agent_id: str,
        engine: CaptureEngine,
        channel: grpc.aio.Channel,
        call_metadata: Metadata = (),
        *,
        witness: Witness,
        sequence: UploadSequence | None = None,
        max_events: int = MAX_EVENTS_PER_BATCH,
        wall_clock: Clock = time.time,
    ) -> None:
        self._agent_id = agent_id
        self._call_metadata = call_metadata
        self._engine = engine
        self._gateway = pb_grpc.IngestGatewayStub(channel)
        self._witness = witness
        self.sequence = sequence or UploadSequence()
        self._max_events = max_events
        self._wall_clock = wall_clock

    async def upload(self) -> None:
        batch = self._engine.pending_batch(self._max_events)
        if batch is None:
            return
        number = self.sequence.next
        request = upload_request(self._agent_id, number, batch, self._wall_clock())
        self._witness.batch_sent(batch.count)
        try:
            answer = await self._gateway.UploadBatch(
                request, timeout=UPLOAD_TIMEOUT_SECONDS, metadata=self._call_metadata
            )
        except grpc.aio.AioRpcError as exc:  # kept for the next round, under the same number
            log.debug("upload_failed", agent_id=self._agent_id, error=exc.code().name)
            return
        if not answer.accepted:
            self._witness.batch_refused()
            self.sequence.refused(answer.next_sequence)
            log.debug("upload_refused", agent_id=self._agent_id, reason=answer.reason)
            return
        self.sequence.accepted(number)
        # Landed, whether or not a pause discarded the spool meanwhile.
        self._witness.batch_accepted(batch.count, batch.last_event_at)
        self._engine.shipped(batch)
