"""Ships the spool, but only what the control plane's ingest check authorizes."""

from __future__ import annotations

import grpc
import structlog
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from agent_stub.capture import CaptureEngine
from agent_stub.identity import Metadata
from agent_stub.wire import timestamp

log = structlog.get_logger("killswitch.agent.upload")

UPLOAD_TIMEOUT_SECONDS = 10.0


class Uploader:
    """Offers the spool to ``Ingest.AuthorizeUpload``; a refused batch stays spooled."""

    def __init__(
        self,
        agent_id: str,
        engine: CaptureEngine,
        channel: grpc.aio.Channel,
        call_metadata: Metadata = (),
    ) -> None:
        self._agent_id = agent_id
        self._call_metadata = call_metadata
        self._engine = engine
        self._ingest = pb_grpc.IngestStub(channel)
        self.events_uploaded = 0
        self.uploads_refused = 0

    def use(self, channel: grpc.aio.Channel) -> None:
        """Upload through another channel from now on (the agent reopened its own)."""
        self._ingest = pb_grpc.IngestStub(channel)

    async def upload(self) -> None:
        batch = self._engine.pending_batch()
        if batch is None:
            return
        request = pb.AuthorizeUploadRequest(
            agent_id=self._agent_id,
            first_event_at=timestamp(batch.first_event_at),
            last_event_at=timestamp(batch.last_event_at),
            event_count=batch.count,
        )
        try:
            answer = await self._ingest.AuthorizeUpload(
                request, timeout=UPLOAD_TIMEOUT_SECONDS, metadata=self._call_metadata
            )
        except grpc.aio.AioRpcError as exc:  # kept for the next round
            log.debug("upload_failed", agent_id=self._agent_id, error=exc.code().name)
            return
        if not answer.allowed:
            self.uploads_refused += 1
            log.debug("upload_refused", agent_id=self._agent_id, reason=answer.reason)
        elif self._engine.shipped(batch):
            self.events_uploaded += batch.count
