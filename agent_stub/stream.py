"""One ``AgentControl.Connect`` call as the agent uses it.

Heartbeats, acks and lease requests are written from different tasks: one lock
keeps each write whole, and the tasks writing to a stream end with it.

grpc aio cancels the whole call when a write is cancelled halfway (the reader then
gets ``CancelledError``, later writers ``InvalidStateError('RPC already finished.')``).
So each write runs in a task of the stream's own: a sender cancelled meanwhile (the
lease renewals a pause ends) leaves the stream alive. Most likely what cut thousands
of streams at a 10,000-agent pause (BENCHMARKS.md, "The fleet stops after the pause").
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any
from typing import Protocol

import grpc
import structlog
from killswitch.v1 import killswitch_pb2 as pb

log = structlog.get_logger("killswitch.agent.stream")

Call = grpc.aio.StreamStreamCall[pb.AgentMessage, pb.ServerMessage]


class Outbox(Protocol):
    """What directive handling needs of a stream (tests pass a fake)."""

    async def send(self, message: pb.AgentMessage) -> None: ...

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]: ...


class StreamEnded(Exception):
    """The call had already finished when the agent wrote to it: the session is over."""


class ControlStream:
    def __init__(self, call: Call) -> None:
        self._call = call
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        # Set when the agent itself cut the stream (it went offline).
        self.dropped = False

    async def send(self, message: pb.AgentMessage) -> None:
        """Write ``message`` whole, in turn; it goes out even if the sender is cancelled
        while it waits (the stream's end cancels it)."""
        await asyncio.shield(self.spawn(self._write(message)))

    async def _write(self, message: pb.AgentMessage) -> None:
        async with self._lock:
            try:
                await self._call.write(message)
            except asyncio.InvalidStateError:
                code = (await self._call.code()).name
                raise StreamEnded(f"the stream had already ended ({code}) at a write") from None

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

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A write on a dead stream: the reader sees the same failure and reconnects.
            log.debug("stream_task_failed", error=repr(task.exception()))

    def drop(self) -> None:
        """Cut the connection abruptly, as a laptop going offline would."""
        self.dropped = True
        self._call.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._call.cancel()
