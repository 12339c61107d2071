"""One ``AgentControl.Connect`` call as the agent uses it.

Heartbeats, acks and lease requests come from different callers; they are queued and
one writer task per stream writes them in turn, each whole.

grpc aio cancels the whole call when a write is cancelled halfway (the reader then
gets ``CancelledError``, later writers ``InvalidStateError('RPC already finished.')``).
So no sender ever runs a write itself: a sender cancelled meanwhile (the lease renewals
a pause ends) leaves the stream alive. Most likely what cut thousands of streams at a
10,000-agent pause (BENCHMARKS.md, "The fleet stops after the pause"). One writer, not
a task per message: at a pause a simulator's 10,000 agents each ack at once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine
from typing import Any
from typing import Protocol

import grpc
import structlog
from killswitch.v1 import killswitch_pb2 as pb

from agent_stub.periodic import Scheduled

log = structlog.get_logger("killswitch.agent.stream")

Call = grpc.aio.StreamStreamCall[pb.AgentMessage, pb.ServerMessage]


class Outbox(Protocol):
    """What directive handling needs of a stream (tests pass a fake)."""

    def send(self, message: pb.AgentMessage) -> None: ...

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]: ...

    def schedule(self, scheduled: Scheduled) -> Scheduled: ...


class ControlStream:
    def __init__(self, call: Call) -> None:
        self._call = call
        self._unsent: deque[pb.AgentMessage] = deque()
        # Set while the writer waits for a message.
        self._wanted: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduled: list[Scheduled] = []
        # Why writing stopped ("" while it goes on); the reader sees the same end.
        self.ended_because = ""
        # Set when the agent itself cut the stream (it went offline).
        self.dropped = False
        self.spawn(self._write_in_turn())

    def send(self, message: pb.AgentMessage) -> None:
        """Queue ``message``: the stream's writer sends it after those queued before it,
        whole, whatever becomes of the sender. Nothing is sent once writing has ended."""
        if self.ended_because:
            log.debug("message_after_stream_end", body=message.WhichOneof("body"))
            return
        self._unsent.append(message)
        wanted = self._wanted
        if wanted is not None and not wanted.done():
            wanted.set_result(None)

    async def _write_in_turn(self) -> None:
        unsent, loop = self._unsent, asyncio.get_running_loop()
        try:
            while True:
                if unsent:
                    await self._call.write(unsent.popleft())
                    continue
                self._wanted = loop.create_future()
                await self._wanted
        except asyncio.InvalidStateError:
            code = (await self._call.code()).name
            self.ended_because = f"the stream had already ended ({code}) at a write"
        except Exception as exc:
            self.ended_because = f"a write failed: {exc!r}"
        unsent.clear()
        # The reader ends the session on it, and the agent reconnects: never a stream that
        # reads on while nothing it writes goes out.
        self._call.cancel()

    async def read(self) -> pb.ServerMessage | None:
        """The next message; None once the server ended the stream."""
        message = await self._call.read()
        return message if isinstance(message, pb.ServerMessage) else None

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` for as long as this stream lives."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def schedule(self, scheduled: Scheduled) -> Scheduled:
        """``scheduled`` (timed work: ``agent_stub.periodic``) for as long as this stream
        lives: cancelled when it closes."""
        self._scheduled = [s for s in self._scheduled if s.pending]
        self._scheduled.append(scheduled)
        return scheduled

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The writer catches its own failures; what lands here is other work on the
            # stream (a slow agent's late apply) that failed: logged, the stream goes on.
            log.debug("stream_task_failed", error=repr(task.exception()))

    def drop(self) -> None:
        """Cut the connection abruptly, as a laptop going offline would."""
        self.dropped = True
        self._call.cancel()

    async def close(self) -> None:
        for scheduled in self._scheduled:
            scheduled.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._call.cancel()
