"""Prometheus metrics: a real server and fleet scraped after a pause, and the gRPC
interceptor and plane observer on their own."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any
from typing import cast

import aiohttp
import grpc
import pytest
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from control.domain import ComplianceState
from control.domain import Mode
from control.domain.readiness import ReadinessPolicy
from control.domain.readiness import ReadinessReport
from control.domain.readiness import assess
from control.events import PlaneObserver
from control.metrics import Metrics
from control.plane import ControlPlane
from control.readiness import Readiness
from control.store import Store
from tests.conftest import Cli
from tests.conftest import ServerProcess
from tests.conftest import Simulator
from tests.conftest import missing_tool
from tests.conftest import wait_capturing
from tests.conftest import wait_for

FLEET = 20
OPERATOR = "killswitch.v1.Operator"
HANDLED = "killswitch_grpc_server_handled_total"
Samples = list[tuple[str, dict[str, str], float]]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing_tool("promtool is not installed: run scripts/test-tools.sh (`make test` does)")
    return path


def scrape(server: ServerProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(r.read().decode())


def samples(text: str) -> Samples:
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def value(found: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for n, ls, v in found if n == name and labels.items() <= ls.items())


def test_fleet_pause_shows_in_real_metrics(
    server: ServerProcess, cli: Cli, simulate: Callable[..., Simulator]
) -> None:
    sim = simulate(server, FLEET)
    wait_capturing(cli, FLEET)
    cli.ok("pause", "--all", "--reason", "metrics test", "--ticket", "INC-7", "--wait")
    epoch = cli.json("status")["epoch"]
    # Refused by the role check (an SRE may not pause), unary and server-streaming.
    assert cli.as_("sre-1").run("pause", "--all", "--reason", "not mine").returncode == 1
    assert cli.as_("employee-1").run("agents").returncode == 1
    cli.json("agents")  # ListAgents, server-streaming, allowed

    def settled() -> Samples | None:
        found = samples(scrape(server))
        # Verified once a heartbeat after the ack showed the counters frozen.
        done = value(found, "killswitch_agents", state="VERIFIED_STOPPED") == FLEET
        return (
            found
            if done and value(found, "killswitch_pause_to_verified_seconds_count") >= FLEET
            else None
        )

    found = wait_for(settled, 20, "every agent verified stopped in /metrics")

    for state in ComplianceState:  # every state exported, zeros included
        expected = FLEET if state is ComplianceState.VERIFIED_STOPPED else 0
        assert [v for n, ls, v in found if n == "killswitch_agents" and ls == {"state": state}] == [
            expected
        ], state
    assert value(found, "killswitch_agents_by_mode", mode="PAUSED") == FLEET
    assert value(found, "killswitch_agents_by_mode", mode="ALLOWED") == 0
    assert value(found, "killswitch_connected_streams") == FLEET
    assert value(found, "killswitch_epoch") == epoch
    assert value(found, "killswitch_active_holds") == 1
    assert value(found, "killswitch_leasing") == 1
    assert value(found, "killswitch_view_age_seconds") == 0, "SQLite: a sole writer"
    assert value(found, "killswitch_acks_total", mode="PAUSED") >= FLEET
    assert value(found, "killswitch_acks_total", mode="ALLOWED") >= FLEET
    assert value(found, "killswitch_directives_sent_total", mode="PAUSED") >= FLEET
    assert value(found, "killswitch_hold_changes_total", kind="incident", change="created") == 1
    assert value(found, "killswitch_pause_to_ack_seconds_count") >= FLEET
    assert value(found, "killswitch_pause_to_verified_seconds_count") >= FLEET
    # Acked within the ack deadline; verified a heartbeat or so later.
    assert value(found, "killswitch_pause_to_ack_seconds_bucket", le="30.0") >= FLEET
    assert value(found, "killswitch_violations_total") == 0
    assert value(found, "killswitch_nacks_total") == 0
    assert value(found, "process_resident_memory_bytes") > 0
    assert value(found, "python_info") == 1

    assert (
        value(found, HANDLED, grpc_service=OPERATOR, grpc_method="CreateHold", grpc_code="OK") >= 1
    )
    assert (
        value(
            found,
            HANDLED,
            grpc_type="unary",
            grpc_service=OPERATOR,
            grpc_method="CreateHold",
            grpc_code="PERMISSION_DENIED",
        )
        >= 1
    )
    streaming = {
        "grpc_type": "server_stream",
        "grpc_service": OPERATOR,
        "grpc_method": "ListAgents",
    }
    assert value(found, HANDLED, **streaming, grpc_code="OK") >= 1
    assert value(found, HANDLED, **streaming, grpc_code="PERMISSION_DENIED") >= 1
    assert value(found, "killswitch_grpc_server_handling_seconds_count", **streaming) >= 2
    connect = {"grpc_type": "bidi_stream", "grpc_method": "Connect"}
    assert value(found, "killswitch_grpc_server_started_total", **connect) >= FLEET

    text = scrape(server)

    # The agents go away: their Connect streams end and are counted as handled.
    sim.stop()

    def streams_ended() -> Samples | None:
        found = samples(scrape(server))
        ended = value(found, HANDLED, **connect) >= FLEET
        return found if ended and value(found, "killswitch_connected_streams") == 0 else None

    found = wait_for(streams_ended, 15, "Connect streams counted as handled")
    assert (
        value(found, "killswitch_agents", state="OFFLINE_LEASE_EXPIRED")
        + value(found, "killswitch_agents", state="OFFLINE_AT_RISK")
        == FLEET
    )

    # Last, as it may skip: the scrape taken while the fleet was paused passes promtool's lint.
    check = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr


def test_openmetrics_on_request(server: ServerProcess) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    with urllib.request.urlopen(request, timeout=5) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        body = r.read().decode()
    assert body.rstrip().endswith("# EOF")
    assert 'killswitch_agents{state="VIOLATION"} 0' in body


# ---------------------------------------------------------------- in process


def idle_plane(observer: PlaneObserver | None = None) -> ControlPlane:
    """A plane that was never started: census() works on its empty memory; the store is
    never called (a sole writer, so its view counts as current)."""
    return ControlPlane(
        cast(Store, SimpleNamespace(sole_writer=True)), clock=time.time, observer=observer
    )


def test_observer_never_raises_and_counts() -> None:
    metrics = Metrics()
    plane = idle_plane(metrics)  # the plane calls it through its guard, as the server does
    metrics.watch(plane)
    observer = plane.observer
    observer.acked("a", epoch=1, mode=Mode.PAUSED, latency=0.4, at=0.0)
    observer.acked("a", epoch=1, mode=Mode.PAUSED, latency=None, at=0.0)  # a re-ack: no latency
    observer.acked("a", epoch=1, mode=Mode.ALLOWED, latency=2.0, at=0.0)  # not a pause
    observer.verified("a", epoch=1, latency=-1.0, at=0.0)  # a wall clock stepped back
    observer.connected("a", reconnect=False, at=0.0)
    observer.connected("a", reconnect=True, at=0.0)
    # Garbage from a buggy caller is swallowed (and logged once), never raised into the plane.
    observer.acked("a", epoch=1, mode=cast(Mode, "BOGUS"), latency=1.0, at=0.0)
    observer.directive_sent("a", epoch=1, mode=cast(Mode, None), at=0.0)
    observer.hold_changed(cast(Any, object()), epoch=1, at=0.0)

    found = samples(generate_latest(metrics.registry).decode())
    assert value(found, "killswitch_acks_total", mode="PAUSED") == 2
    assert value(found, "killswitch_acks_total", mode="ALLOWED") == 1
    assert value(found, "killswitch_pause_to_ack_seconds_count") == 1
    assert value(found, "killswitch_pause_to_ack_seconds_bucket", le="0.5") == 1
    assert value(found, "killswitch_pause_to_verified_seconds_bucket", le="0.1") == 1
    assert value(found, "killswitch_agent_reconnects_total") == 1
    assert value(found, "killswitch_agents", state="NEVER_SEEN") == 0
    assert value(found, "killswitch_epoch") == 0
    assert value(found, "killswitch_store_writable") == 1
    assert value(found, "killswitch_store_unwritable_cause", cause="disk_full") == 0
    assert len([n for n, _, _ in found if n == "killswitch_agents"]) == len(ComplianceState)
    assert value(found, "killswitch_observer_failures_total", observer="Metrics") == 3


def test_every_handler_kind_is_measured_and_unchanged() -> None:
    """Unary, server-streaming (async generator), client-streaming and bidi (context
    read/write) handlers, and a plain synchronous one, answer exactly as without the
    interceptor; each is counted with the status it ended with."""
    asyncio.run(_exercise_handlers())


async def _exercise_handlers() -> None:
    metrics = Metrics()

    async def unary(request: bytes, context: Any) -> bytes:
        if request == b"abort":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        if request == b"set":
            context.set_code(grpc.StatusCode.ALREADY_EXISTS)
        if request == b"crash":
            raise RuntimeError("bug")
        if request == b"slow":
            await asyncio.sleep(30)
        return request.upper()

    async def server_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for i in range(3):
            yield b"%d" % i
        if request == b"abort":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "stop")

    async def client_stream(requests: AsyncIterator[bytes], context: Any) -> bytes:
        return b"+".join([r async for r in requests])

    async def bidi(requests: Any, context: Any) -> None:
        while (message := await context.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            if message == b"abort":
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not you")
            await context.write(message + b"!")

    def sync_unary(request: bytes, context: Any) -> bytes:
        return request[::-1]

    identity: Callable[[bytes], bytes] = bytes
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=identity, response_serializer=identity
        ),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Sync": grpc.unary_unary_rpc_method_handler(sync_unary),
    }
    server = grpc.aio.server(
        interceptors=[metrics.interceptor()], migration_thread_pool=ThreadPoolExecutor(2)
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Svc", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:

            async def code_of(call: Awaitable[Any]) -> grpc.StatusCode:
                try:
                    await call
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            call = channel.unary_unary("/t.Svc/Unary", identity, identity)
            assert await call(b"hi") == b"HI"
            assert await code_of(call(b"abort")) is grpc.StatusCode.NOT_FOUND
            assert await code_of(call(b"set")) is grpc.StatusCode.ALREADY_EXISTS
            assert await code_of(call(b"crash")) is grpc.StatusCode.UNKNOWN
            assert await channel.unary_unary("/t.Svc/Sync", identity, identity)(b"abc") == b"cba"

            stream = channel.unary_stream("/t.Svc/ServerStream", identity, identity)
            assert [r async for r in stream(b"ok")] == [b"0", b"1", b"2"]
            received: list[bytes] = []
            aborted = stream(b"abort")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for r in aborted:
                    received.append(r)
            assert received == [b"0", b"1", b"2"]
            assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION

            upload = channel.stream_unary("/t.Svc/ClientStream", identity, identity)
            assert await upload(iter([b"a", b"b"])) == b"a+b"

            bidi_call = channel.stream_stream("/t.Svc/Bidi", identity, identity)(None)
            await bidi_call.write(b"x")
            assert await bidi_call.read() == b"x!"
            await bidi_call.done_writing()
            assert await bidi_call.read() is grpc.aio.EOF  # type: ignore[attr-defined]
            assert await bidi_call.code() is grpc.StatusCode.OK
            refused = channel.stream_stream("/t.Svc/Bidi", identity, identity)(None)
            await refused.write(b"abort")
            assert await refused.code() is grpc.StatusCode.PERMISSION_DENIED
            # The client gives up: gRPC cancels the handler.
            assert await code_of(call(b"slow", timeout=0.2)) is grpc.StatusCode.DEADLINE_EXCEEDED
            cancelled = call(b"slow")
            await asyncio.sleep(0.2)
            cancelled.cancel()
            for _ in range(100):
                found = samples(generate_latest(metrics.registry).decode())
                if value(found, HANDLED, grpc_method="Unary", grpc_code="CANCELLED"):
                    break
                await asyncio.sleep(0.05)
            unknown = channel.unary_unary("/t.Svc/Nope", identity, identity)
            assert await code_of(unknown(b"")) is grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)

    found = samples(generate_latest(metrics.registry).decode())
    expected = {
        ("unary", "Unary", "OK"): 1,
        ("unary", "Unary", "NOT_FOUND"): 1,
        ("unary", "Unary", "ALREADY_EXISTS"): 1,
        ("unary", "Unary", "UNKNOWN"): 1,
        ("unary", "Unary", "DEADLINE_EXCEEDED"): 1,
        ("unary", "Unary", "CANCELLED"): 1,
        ("unary", "Sync", "OK"): 1,
        ("server_stream", "ServerStream", "OK"): 1,
        ("server_stream", "ServerStream", "FAILED_PRECONDITION"): 1,
        ("client_stream", "ClientStream", "OK"): 1,
        ("bidi_stream", "Bidi", "OK"): 1,
        ("bidi_stream", "Bidi", "PERMISSION_DENIED"): 1,
    }
    got = {
        (ls["grpc_type"], ls["grpc_method"], ls["grpc_code"]): v
        for n, ls, v in found
        if n == HANDLED and ls["grpc_service"] == "t.Svc"
    }
    assert got == expected
    # Unknown methods never reach a handler: not counted (gRPC answers UNIMPLEMENTED).
    assert not [ls for n, ls, _ in found if n == HANDLED and ls["grpc_method"] == "Nope"]
    assert value(found, "killswitch_grpc_server_started_total", grpc_service="t.Svc") == 12
    assert value(found, "killswitch_grpc_server_handling_seconds_count", grpc_service="t.Svc") == 12


def test_scrapes_reuse_a_recent_readiness_assessment() -> None:
    """Assessing every agent per scrape held the loop at 19,000 agents: a scrape within
    READINESS_MAX_AGE_SECONDS of the last assessment exports it again."""

    class CountingReadiness:
        def __init__(self) -> None:
            self.assessed = 0

        async def assess(self) -> ReadinessReport:
            self.assessed += 1
            return assess([], ReadinessPolicy(), now=0.0)

    async def scenario() -> int:
        metrics = Metrics()
        readiness = CountingReadiness()
        metrics.watch(idle_plane(), cast(Readiness, readiness))
        app = web.Application()
        app.add_routes(metrics.routes())
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.get(f"http://127.0.0.1:{port}/metrics") as reply:
                    assert "killswitch_readiness_agents" in await reply.text()
        await runner.cleanup()
        return readiness.assessed

    assert asyncio.run(scenario()) == 1
