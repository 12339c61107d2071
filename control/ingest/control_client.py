"""The gateway's questions to the control plane: batched, with a short deadline, fail closed.

Checks from concurrent uploads are sent together as one ``Ingest.AuthorizeBatches``,
the way a database groups commits: with a call slot free, whatever is waiting at the end
of this turn of the event loop goes at once (no added delay when the gateway is quiet);
with every slot busy, checks pile up and the next call carries them all (at most a full
call's worth). So the number of calls follows the round trip, not the upload rate.
Each address is tried in turn; when none answers in time, every waiting upload hears
``ControlUnreachable`` and is refused: nothing is accepted, nothing is buffered.
Accepted batches are reported with ``Ingest.RecordAccepted`` in the background; a report
that fails is kept and sent again (they are figures and evidence, never a condition of
acceptance).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from typing import Any

import grpc
import structlog
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from control.errors import KillswitchError
from control.ingest.watch import StandingCopy
from control.pki import Identity
from control.rpc.convert import seconds
from control.wire import INSECURE_IDENTITY_HEADER

log = structlog.get_logger("killswitch.ingest.control")

# Per address: past this the next is tried, and past the last every waiting batch is refused.
CONTROL_DEADLINE_SECONDS = 1.0
# How many checks one call carries (the control server takes at most 500; 256 checks
# stay well under its message cap).
MAX_CHECKS_PER_CALL = 256
# Calls in flight at once (the control server admits 16 per identity). Two keep one
# call's round trip from idling the pipe while the other's answer is being handed out.
MAX_CALLS_IN_FLIGHT = 2
REPORT_INTERVAL_SECONDS = 0.2
# How often the AuthorizeBatches round-trip times are logged (p50/p99 of the window).
LATENCY_LOG_SECONDS = 10.0
# Reports kept while the control plane is away; past this the oldest are dropped (and
# logged): the data itself is safe in the sink.
MAX_PENDING_REPORTS = 100_000
# A watch stream silent this long is dropped and opened again (the copy itself stops
# being used much sooner: control/ingest/watch.py FRESH_SECONDS).
WATCH_SILENCE_SECONDS = 3.0
WATCH_RETRY_SECONDS = 0.5
# Who the gateway claims to be to an insecure (development) control server.
INSECURE_CLAIM = "ingest-1:ingest"


class ControlUnreachable(KillswitchError):
    """No control-plane address answered in time: refuse, never guess."""


class ControlClient:
    def __init__(self, addresses: Sequence[str], identity: Identity | None) -> None:
        self._metadata: tuple[tuple[str, str], ...] = ()
        if identity is None:
            channels = [grpc.aio.insecure_channel(a) for a in addresses]
            self._metadata = ((INSECURE_IDENTITY_HEADER, INSECURE_CLAIM),)
        else:
            credentials = grpc.ssl_channel_credentials(
                identity.ca_pem, identity.key_pem, identity.cert_pem
            )
            channels = [grpc.aio.secure_channel(a, credentials) for a in addresses]
        self._channels = channels
        self._stubs = [pb_grpc.IngestStub(c) for c in channels]
        self._addresses = list(addresses)
        self._waiting: list[tuple[pb.BatchCheck, asyncio.Future[pb.BatchVerdict]]] = []
        self._flush_scheduled = False
        self._asking: set[asyncio.Task[None]] = set()
        self._reports: list[pb.AcceptedBatch] = []
        # AuthorizeBatches round trips (seconds) and checks since the last latency log.
        self._round_trips: list[float] = []
        self._checks_asked = 0
        self._reporter: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.copy = StandingCopy()

    def start(self) -> None:
        self._reporter = asyncio.create_task(self._report_forever(), name="ingest-reports")
        self._watcher = asyncio.create_task(self._watch_forever(), name="ingest-watch")

    async def close(self) -> None:
        for task in (self._reporter, self._watcher):
            if task is not None:
                task.cancel()
        await self._send_reports()  # one last try: what cannot be sent is logged
        for channel in self._channels:
            await channel.close(grace=None)

    # ------------------------------------------------------------ verdicts

    async def decide(self, check: pb.BatchCheck) -> pb.BatchVerdict:
        """The control plane's verdict on one batch, asked together with its neighbours."""
        future: asyncio.Future[pb.BatchVerdict] = asyncio.get_running_loop().create_future()
        self._waiting.append((check, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        """Send what waits, while a call slot is free; a finished call flushes again."""
        self._flush_scheduled = False
        while self._waiting and len(self._asking) < MAX_CALLS_IN_FLIGHT:
            batch = self._waiting[:MAX_CHECKS_PER_CALL]
            del self._waiting[:MAX_CHECKS_PER_CALL]
            task = asyncio.create_task(self._ask(batch))
            self._asking.add(task)
            task.add_done_callback(self._call_done)

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self._asking.discard(task)
        self._flush()

    async def _ask(
        self, batch: list[tuple[pb.BatchCheck, asyncio.Future[pb.BatchVerdict]]]
    ) -> None:
        request = pb.AuthorizeBatchesRequest(checks=[check for check, _ in batch])
        try:
            started = time.perf_counter()
            response = await self._call("AuthorizeBatches", request)
            self._round_trips.append(time.perf_counter() - started)
            self._checks_asked += len(batch)
            if len(response.verdicts) != len(batch):
                raise ControlUnreachable("the control plane answered a different number of checks")
        except ControlUnreachable as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), verdict in zip(batch, response.verdicts, strict=True):
            if not future.done():
                future.set_result(verdict)

    async def _call(self, method: str, request: object) -> Any:
        errors = []
        for address, stub in zip(self._addresses, self._stubs, strict=True):
            try:
                return await getattr(stub, method)(
                    request, timeout=CONTROL_DEADLINE_SECONDS, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{address}: {exc.code().name} {exc.details() or ''}".strip())
        log.warning("control_plane_unreachable", method=method, errors=errors)
        raise ControlUnreachable("no answer from the control plane (" + "; ".join(errors) + ")")

    # ------------------------------------------------------------ the standing copy

    async def _watch_forever(self) -> None:
        """Keep ``copy`` current from the first address that streams it."""
        while True:
            for address, stub in zip(self._addresses, self._stubs, strict=True):
                call = stub.WatchUploads(pb.WatchUploadsRequest(), metadata=self._metadata)
                try:
                    while True:
                        message = await asyncio.wait_for(call.read(), WATCH_SILENCE_SECONDS)
                        if not isinstance(message, pb.UploadStates):
                            break  # the server ended the stream
                        self.copy.apply(
                            seconds(message.as_of),
                            message.full,
                            {
                                s.agent_id: seconds(s.lease_expires_at)
                                if s.HasField("lease_expires_at")
                                else None
                                for s in message.states
                            },
                            time.monotonic(),
                        )
                except (grpc.aio.AioRpcError, TimeoutError) as exc:
                    why = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "silent"
                    log.info("upload_watch_lost", address=address, error=why)
                finally:
                    call.cancel()
                    self.copy.forget()
            await asyncio.sleep(WATCH_RETRY_SECONDS)

    # ------------------------------------------------------------ accepted reports

    def report_accepted(self, batch: pb.AcceptedBatch) -> None:
        self._reports.append(batch)
        if len(self._reports) > MAX_PENDING_REPORTS:
            dropped = len(self._reports) - MAX_PENDING_REPORTS
            del self._reports[:dropped]
            log.error("accepted_reports_dropped", count=dropped)

    async def _report_forever(self) -> None:
        next_log = time.monotonic() + LATENCY_LOG_SECONDS
        while True:
            await asyncio.sleep(REPORT_INTERVAL_SECONDS)
            await self._send_reports()
            if time.monotonic() >= next_log:
                next_log += LATENCY_LOG_SECONDS
                self._log_round_trips()

    def _log_round_trips(self) -> None:
        """The authorization latency the gateway adds, per window (bench/ reads it)."""
        trips, self._round_trips = sorted(self._round_trips), []
        checks, self._checks_asked = self._checks_asked, 0
        if not trips:
            return
        log.info(
            "authorization_latency",
            calls=len(trips),
            checks=checks,
            p50_ms=round(statistics.median(trips) * 1000, 2),
            p99_ms=round(trips[min(len(trips) - 1, int(0.99 * len(trips)))] * 1000, 2),
        )

    async def _send_reports(self) -> None:
        while self._reports:
            batch = self._reports[:MAX_CHECKS_PER_CALL]
            try:
                await self._call("RecordAccepted", pb.RecordAcceptedRequest(batches=batch))
            except ControlUnreachable:
                return  # kept: sent again next round
            del self._reports[: len(batch)]
