"""Hostile runbooks against a real server: refused in one short line, and meanwhile the
incident commander is still answered (issue 15: a 421-byte alias bomb once held the
event loop for 12 s, IC calls included)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from aiohttp import web
from killswitch.v1 import killswitch_pb2 as pb
from killswitch.v1 import killswitch_pb2_grpc as pb_grpc

from control.domain.rollout import PrometheusGate
from control.domain.rollout import PrometheusReading
from control.pki import load_identity
from control.prometheus_sources import PrometheusSources
from control.untrusted import MAX_DOCUMENT_BYTES
from tests.conftest import ServerProcess
from tests.conftest import free_port
from tests.hostile_documents import HOSTILE

# Generous: before the fix one alias bomb kept GetStatus waiting 12 s.
STATUS_DEADLINE = 5.0
# Fewer than the 16 calls one identity may have in flight.
BOMBS_PER_IDENTITY = 8
SENDERS = ("sre-1", "approver-1", "automation-1")
SHORT = 200


def channel(server: ServerProcess, name: str) -> grpc.Channel:
    identity = load_identity(server.identity(name))
    return grpc.secure_channel(
        server.address,
        grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem),
    )


def plan(stub: pb_grpc.RunbooksStub, text: str) -> grpc.RpcError | None:
    request = pb.PlanRunbookRequest(runbook=pb.RunbookSource(text=text, file_name="bomb.yaml"))
    try:
        stub.PlanRunbook(request, timeout=60)
    except grpc.RpcError as exc:
        return exc
    return None


@pytest.fixture
def ic_status(server: ServerProcess) -> Iterator[pb_grpc.OperatorStub]:
    with channel(server, "ic-1") as ic:
        stub = pb_grpc.OperatorStub(ic)
        stub.GetStatus(pb.GetStatusRequest(), timeout=STATUS_DEADLINE)  # connected
        yield stub


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_runbook_is_refused_while_the_incident_commander_is_answered(
    server: ServerProcess, ic_status: pb_grpc.OperatorStub, name: str
) -> None:
    channels = [channel(server, sender) for sender in SENDERS]
    try:
        with ThreadPoolExecutor(len(SENDERS) * BOMBS_PER_IDENTITY) as pool:
            bombs: list[Future[grpc.RpcError | None]] = [
                pool.submit(plan, pb_grpc.RunbooksStub(c), HOSTILE[name])
                for c in channels
                for _ in range(BOMBS_PER_IDENTITY)
            ]
            answered = 0
            while not all(b.done() for b in bombs) or answered == 0:
                ic_status.GetStatus(pb.GetStatusRequest(), timeout=STATUS_DEADLINE)
                answered += 1
            refusals = [b.result() for b in bombs]
    finally:
        for c in channels:
            c.close()
    for refusal in refusals:
        assert isinstance(refusal, grpc.Call), refusal
        assert refusal.code() is grpc.StatusCode.INVALID_ARGUMENT, refusal
        details = refusal.details() or ""
        assert details.startswith("bomb.yaml") and len(details) < SHORT, details
        assert "\n" not in details and "lol', 'lol" not in details


def test_alias_bomb_is_refused_as_an_alias(
    server: ServerProcess, ic_status: pb_grpc.OperatorStub
) -> None:
    with channel(server, "sre-1") as sre:
        refusal = plan(pb_grpc.RunbooksStub(sre), HOSTILE["alias-bomb"])
    assert isinstance(refusal, grpc.Call)
    assert refusal.details() == (
        "bomb.yaml:2: YAML anchors ('&l0') are not allowed; write the value out"
    )
    ic_status.GetStatus(pb.GetStatusRequest(), timeout=STATUS_DEADLINE)


# ---------------------------------------------------------------- a hostile Prometheus


ANSWERS = {
    "good": json.dumps(
        {"status": "success", "data": {"resultType": "vector", "result": [{"value": [1, "3"]}]}}
    ).encode(),
    "deep": b"[" * 30_000,
    "oversized": b'{"status": "error", "error": "' + b"x" * (MAX_DOCUMENT_BYTES * 4) + b'"}',
    "echoing": json.dumps({"status": "error", "error": "y" * 20_000}).encode(),
}


async def query(server: str, kind: str) -> PrometheusReading:
    """What the gate reads from a source configured as ``server``'s ``kind`` path."""
    sources = PrometheusSources([("fake", f"{server}/{kind}")])
    return await sources.query(PrometheusGate(query="up", source="fake"))


@pytest.fixture
def fake_prometheus() -> Iterator[str]:
    """An HTTP server answering each query path with one body of ``ANSWERS``."""
    port = free_port()
    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=ANSWERS[request.match_info["kind"]])

    async def serve() -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/{kind}/api/v1/query", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    def run() -> None:
        runner = loop.run_until_complete(serve())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_a_good_prometheus_answer_is_read(fake_prometheus: str) -> None:
    assert asyncio.run(query(fake_prometheus, "good")).value == 3.0


@pytest.mark.parametrize("kind", [kind for kind in ANSWERS if kind != "good"])
def test_hostile_prometheus_answer_is_a_short_gate_error(fake_prometheus: str, kind: str) -> None:
    reading = asyncio.run(query(fake_prometheus, kind))
    assert reading.value is None and reading.error, reading
    assert len(reading.error) < SHORT and "\n" not in reading.error, reading.error
