"""The ingest drill's baseline: a bare gRPC upload sink, the floor gRPC sets on this machine.

A grpc.aio server implementing only ``IngestGateway.UploadBatch``: it appends each
batch, serialized, to one file (4-byte big-endian length, then the bytes, as the
product's sink frames its records) and answers "accepted". No identity check, no
sequence or date check, no control plane, no manifest, no fsync. Run by
``bench.ingest_drill``::

    python -m bench.bare_sink --port 50099 --out /tmp/bare-sink.log
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
from pathlib import Path
from typing import Any
from typing import BinaryIO

import grpc
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

LENGTH = struct.Struct(">I")


class BareSink(pb_grpc.IngestGatewayServicer):
    def __init__(self, out: BinaryIO) -> None:
        self._out = out

    async def UploadBatch(  # noqa: N802
        self, request: pb.UploadBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UploadBatchResponse:
        record = request.SerializeToString()
        self._out.write(LENGTH.pack(len(record)) + record)
        return pb.UploadBatchResponse(
            accepted=True, reason="ok", next_sequence=request.sequence + 1
        )


def count_records(path: Path, start: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """(records, offset) after scanning from ``start`` (a previous answer): cheap to repeat."""
    records, offset = start
    try:
        with path.open("rb") as file:
            file.seek(offset)
            while header := file.read(LENGTH.size):
                if len(header) < LENGTH.size:
                    break
                (length,) = LENGTH.unpack(header)
                if file.seek(length, 1) > path.stat().st_size:
                    break  # a record still being written
                records += 1
                offset += LENGTH.size + length
    except FileNotFoundError:
        pass
    return records, offset


async def serve(port: int, out_path: Path) -> None:
    with out_path.open("ab", buffering=1024 * 1024) as out:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 2 * 1024 * 1024)])
        pb_grpc.add_IngestGatewayServicer_to_server(BareSink(out), server)
        if not server.add_insecure_port(f"127.0.0.1:{port}"):
            raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        flushing = asyncio.create_task(_flush_forever(out))
        await stop.wait()
        flushing.cancel()
        await server.stop(grace=1)


async def _flush_forever(out: BinaryIO) -> None:
    """Hand the buffer to the OS every 0.2 s, so the harness can count what landed."""
    while True:
        await asyncio.sleep(0.2)
        out.flush()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_sink", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.out))


if __name__ == "__main__":
    main()
