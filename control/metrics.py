"""Prometheus metrics for the control server, on a registry of its own, served at ``/metrics``.

Three sources feed it:

- plane events (``PlaneObserver``): counters and the pause latency histograms. They run in
  the plane's hot path, so each is O(1); the plane calls them through its observer guard
  (``control.events.Observers``), whose count of swallowed failures is exported too;
- the plane's ``census()``, read at scrape time by a custom collector: agents by compliance
  state and by effective mode, live streams, the epoch, active holds. Every state and mode
  is exported, zeros included, and nothing is labelled per agent;
- a gRPC server interceptor: RPCs started and handled by method and status code, and their
  handling time, under go-grpc-prometheus's names with the ``killswitch_`` prefix.

Names follow the Prometheus conventions (base units, ``_seconds``, ``_total`` for
counters); ``promtool check metrics`` runs on a real scrape in the tests.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import AsyncGenerator
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from contextlib import aclosing
from typing import Any
from typing import ParamSpec

import grpc
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Histogram
from prometheus_client import gc_collector
from prometheus_client import platform_collector
from prometheus_client import process_collector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from control.domain import ComplianceState
from control.domain import Hold
from control.domain import HoldKind
from control.domain import Mode
from control.domain.readiness import ReadinessClass
from control.domain.readiness import ReadinessReport
from control.errors import StoreError
from control.errors import one_line
from control.events import ObserverFailures
from control.events import PlaneObserver
from control.loop_lag import LoopLag
from control.plane import Census
from control.plane import ControlPlane
from control.readiness import Readiness
from control.rpc.handler_cache import Handler
from control.rpc.handler_cache import WrappingInterceptor
from control.store import causes
from control.store_health import StoreHealth

# How long a scrape waits for the readiness assessment's store read.
READINESS_SCRAPE_SECONDS = 1.0
# A scrape reuses an assessment this recent: readiness is a posture (versions, clocks,
# certificates, days offline), and assessing 20,000 agents per scrape costs the loop.
READINESS_MAX_AGE_SECONDS = 30.0
log = structlog.get_logger("killswitch.metrics")

# Pauses are acknowledged in well under a second by a healthy agent and verified one
# heartbeat later (10 s by default); stragglers take minutes, up to the ack deadline and beyond.
PAUSE_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Unary calls take milliseconds (prometheus_client's default buckets); an agent's Connect
# stream lasts as long as the agent stays up.
GRPC_HANDLING_BUCKETS = (*Histogram.DEFAULT_BUCKETS[:-1], 60.0, 600.0, 3600.0)

_P = ParamSpec("_P")


class Metrics(PlaneObserver):
    """The server's metrics: a plane observer, a census collector, a gRPC interceptor."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        process_collector.ProcessCollector(registry=self.registry)
        platform_collector.PlatformCollector(registry=self.registry)
        gc_collector.GCCollector(registry=self.registry)
        self._census = CensusCollector()
        self.registry.register(self._census)
        self._readiness: Readiness | None = None
        self._readiness_assessed_at = -math.inf  # monotonic
        self._grpc = GrpcServerMetrics(self.registry)
        # Run by the server (``loop_lag.run()``) on its loop.
        self.loop_lag = LoopLag(self.registry)
        registry = self.registry

        self.directives_sent = Counter(
            "killswitch_directives_sent",
            "Directives written to agent streams, by the mode they carried.",
            ["mode"],
            registry=registry,
        )
        self.acks = Counter(
            "killswitch_acks",
            "Acks accepted from agents (stale or replayed acks excluded), by acked mode.",
            ["mode"],
            registry=registry,
        )
        self.nacks = Counter(
            "killswitch_nacks",
            "Nacks from agents: they tried to apply a directive and could not.",
            registry=registry,
        )
        self.violations = Counter(
            "killswitch_violations",
            "Agents newly flagged VIOLATION: capture continued after they acked a pause.",
            registry=registry,
        )
        self.reconnects = Counter(
            "killswitch_agent_reconnects",
            "Streams opened by agents this server had seen before (restarts, network drops).",
            registry=registry,
        )
        self.uploads_refused = Counter(
            "killswitch_upload_authorizations_refused",
            "Upload authorizations refused to the ingest service (paused or lease-less agent).",
            registry=registry,
        )
        self.hold_changes = Counter(
            "killswitch_hold_changes",
            "Holds created or lifted, by hold kind.",
            ["kind", "change"],
            registry=registry,
        )
        self.pause_to_ack = Histogram(
            "killswitch_pause_to_ack_seconds",
            "Time from an agent's pause (its desired state changing) to its ack of that pause.",
            buckets=PAUSE_LATENCY_BUCKETS,
            registry=registry,
        )
        self.pause_to_verified = Histogram(
            "killswitch_pause_to_verified_seconds",
            "Time from an agent's pause to its stop being verified (counters and spool frozen).",
            buckets=PAUSE_LATENCY_BUCKETS,
            registry=registry,
        )
        # Children resolved once: the hot path does no label lookups. Every series exists
        # from the start (at 0), so rate() and increase() see the first event.
        self._directives_by_mode = {m: self.directives_sent.labels(mode=m.value) for m in Mode}
        self._acks_by_mode = {m: self.acks.labels(mode=m.value) for m in Mode}
        for kind in HoldKind:
            for change in ("created", "lifted"):
                self.hold_changes.labels(kind=kind.value, change=change)

    # ------------------------------------------------------------ wiring

    def watch(self, plane: ControlPlane, readiness: Readiness | None = None) -> None:
        """Read this plane's census, and assess its readiness, at every scrape."""
        self._census.plane = plane
        self._readiness = readiness

    def interceptor(self) -> GrpcServerMetrics:
        """The gRPC server interceptor; put it first, so it also counts refused calls."""
        return self._grpc

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/metrics", self._serve)]

    async def _serve(self, request: web.Request) -> web.Response:
        # On the event loop, like the plane: the census reads its state without locks.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        try:
            await self._assess_readiness()
            body = encoder(self.registry)
        except Exception:
            log.exception("metrics_scrape_failed")
            return web.Response(status=500, text="collecting metrics failed; see the server log\n")
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _assess_readiness(self) -> None:
        """At most every ``READINESS_MAX_AGE_SECONDS``. A store read (certificates),
        bounded: a scrape never waits on a store that is gone (a replica that lost its
        database must still answer /metrics); then the last assessment is exported again."""
        if self._readiness is None:
            return
        if time.monotonic() - self._readiness_assessed_at < READINESS_MAX_AGE_SECONDS:
            return
        try:
            self._census.readiness = await asyncio.wait_for(
                self._readiness.assess(), READINESS_SCRAPE_SECONDS
            )
            self._readiness_assessed_at = time.monotonic()
        except (TimeoutError, StoreError) as exc:
            log.warning("readiness_not_assessed", error=one_line(exc) or "timed out")

    # ------------------------------------------------------------ plane events

    def connected(self, agent_id: str, *, reconnect: bool, at: float) -> None:
        if reconnect:
            self.reconnects.inc()

    def directive_sent(self, agent_id: str, *, epoch: int, mode: Mode, at: float) -> None:
        self._directives_by_mode[mode].inc()

    def acked(
        self, agent_id: str, *, epoch: int, mode: Mode, latency: float | None, at: float
    ) -> None:
        self._acks_by_mode[mode].inc()
        if mode is Mode.PAUSED and latency is not None:
            # Wall clocks can step back: never a negative latency.
            self.pause_to_ack.observe(max(latency, 0.0))

    def nacked(self, agent_id: str, *, epoch: int, reason: str, at: float) -> None:
        self.nacks.inc()

    def verified(self, agent_id: str, *, epoch: int, latency: float, at: float) -> None:
        self.pause_to_verified.observe(max(latency, 0.0))

    def violation(self, agent_id: str, *, evidence: str, at: float) -> None:
        self.violations.inc()

    def upload_refused(self, agent_id: str, *, reason: str, at: float) -> None:
        self.uploads_refused.inc()

    def hold_changed(self, hold: Hold, *, epoch: int, at: float) -> None:
        change = "created" if hold.active else "lifted"
        self.hold_changes.labels(kind=hold.kind.value, change=change).inc()


class CensusCollector:
    """Gauges computed at scrape time from one ``plane.census()`` pass."""

    def __init__(self) -> None:
        self.plane: ControlPlane | None = None
        self.readiness: ReadinessReport | None = None

    def describe(self) -> Iterable[Metric]:
        return [
            *self._families(None),
            *_store_families(None),
            *self._leasing(None),
            _readiness_family(None),
            _observer_failures_family(None),
        ]

    def collect(self) -> Iterable[Metric]:
        if self.plane is None:
            return []
        return [
            *self._families(self.plane.census()),
            *_store_families(self.plane.store_health),
            *self._leasing(self.plane),
            _readiness_family(self.readiness),
            _observer_failures_family(self.plane.observer_failures),
        ]

    @staticmethod
    def _leasing(plane: ControlPlane | None) -> list[Metric]:
        view_age = GaugeMetricFamily(
            "killswitch_view_age_seconds",
            "Age of this replica's view of the holds; leases are cut by it, and none are"
            " granted past a quarter of the lease TTL. 0 on a sole-writer (SQLite) store.",
        )
        leasing = GaugeMetricFamily(
            "killswitch_leasing",
            "1 while this replica may grant leases (its store takes writes and its view of"
            " the holds is recent), else 0: its agents stop within one lease TTL.",
        )
        if plane is not None:
            age = plane.view.age()
            view_age.add_metric([], age if age != float("inf") else -1.0)
            leasing.add_metric([], 1.0 if plane.leasing else 0.0)
        return [view_age, leasing]

    @staticmethod
    def _families(census: Census | None) -> list[Metric]:
        agents = GaugeMetricFamily(
            "killswitch_agents",
            "Agents by compliance state (see the README's compliance states).",
            labels=["state"],
        )
        by_mode = GaugeMetricFamily(
            "killswitch_agents_by_mode",
            "Agents by effective mode: PAUSED when an active hold covers them, else ALLOWED.",
            labels=["mode"],
        )
        streams = GaugeMetricFamily(
            "killswitch_connected_streams", "Agents with a live control stream to this server."
        )
        epoch = GaugeMetricFamily(
            "killswitch_epoch", "The current epoch: it goes up with every hold change."
        )
        holds = GaugeMetricFamily("killswitch_active_holds", "Holds in force.")
        mismatched = GaugeMetricFamily(
            "killswitch_agents_label_mismatch",
            "Agents whose reported labels contradict the server's (which alone decide holds).",
        )
        after_pause = GaugeMetricFamily(
            "killswitch_events_accepted_after_pause",
            "Events the ingest gateway accepted dated after their agent's stop, summed over"
            " agents (each counted since its newest stop): 0 unless data landed after a pause.",
        )
        if census is not None:
            after_pause.add_metric([], census.events_accepted_after_pause)
            for state in ComplianceState:
                agents.add_metric([state.value], census.by_state.get(state, 0))
            for mode in Mode:
                by_mode.add_metric([mode.value], census.by_mode.get(mode, 0))
            streams.add_metric([], census.connected_streams)
            epoch.add_metric([], census.epoch)
            holds.add_metric([], census.active_holds)
            mismatched.add_metric([], census.label_mismatches)
        return [agents, by_mode, streams, epoch, holds, mismatched, after_pause]


def _readiness_family(report: ReadinessReport | None) -> Metric:
    family = GaugeMetricFamily(
        "killswitch_readiness_agents",
        "Agents that would not honour a pause now, by readiness class (an agent counts in"
        " each of its classes); severity is cannot-honour or warning (README: Readiness).",
        labels=["class", "severity"],
    )
    if report is not None:
        for cls, count in report.counts().items():
            family.add_metric([cls.value, _severity(cls)], count)
    return family


def _observer_failures_family(failures: ObserverFailures | None) -> Metric:
    family = CounterMetricFamily(
        "killswitch_observer_failures",
        "Exceptions a plane observer (metrics, timeline, runbook runner) raised, swallowed by"
        " the plane's guard so that no ack or heartbeat failed: each is a bug (see the log).",
        labels=["observer"],
    )
    for observer, count in (failures.counts if failures else {}).items():
        family.add_metric([observer], count)
    return family


def _severity(cls: ReadinessClass) -> str:
    return "cannot-honour" if cls.cannot_honour else "warning"


def _store_families(health: StoreHealth | None) -> list[Metric]:
    """Whether the store takes writes, and if not why: one series per known cause, so
    the labels stay a fixed set whatever the driver said."""
    writable = GaugeMetricFamily(
        "killswitch_store_writable",
        "1 while the store takes writes (leases are granted), 0 while it does not.",
    )
    cause = GaugeMetricFamily(
        "killswitch_store_unwritable_cause",
        "1 for the reason the store does not take writes now (see /readyz for the line).",
        labels=["cause"],
    )
    if health is not None:
        writable.add_metric([], 1 if health.healthy else 0)
        now = causes.label_for(health.cause) if health.cause else ""
        for label in (*causes.CAUSE_LABELS.values(), causes.OTHER_LABEL):
            cause.add_metric([label], 1 if label == now else 0)
    return [writable, cause]


# ---------------------------------------------------------------- gRPC


_GRPC_TYPES = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}
_LABELS = ["grpc_type", "grpc_service", "grpc_method"]


def _split_method(full_method: str) -> tuple[str, str]:
    """``/killswitch.v1.Operator/CreateHold`` -> (``killswitch.v1.Operator``, ``CreateHold``)."""
    service, slash, method = full_method.removeprefix("/").rpartition("/")
    return (service, method) if slash else ("unknown", full_method)


def _code_name(context: Any, default: grpc.StatusCode) -> str:
    """The status the handler set (``context.abort``, ``context.set_code``), else ``default``."""
    try:
        code = context.code()
    except Exception:
        code = None
    return str(getattr(code, "name", None) or default.name)


def _failure_code(exc: BaseException, context: Any) -> str:
    if isinstance(exc, grpc.aio.AbortError):
        return _code_name(context, grpc.StatusCode.UNKNOWN)
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        # gRPC cancels the handler when the client cancels, goes away, or runs out of time.
        try:
            remaining = context.time_remaining()
        except Exception:
            remaining = None
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED.name
        return grpc.StatusCode.CANCELLED.name
    # gRPC answers any other exception with UNKNOWN, whatever code was set before.
    return grpc.StatusCode.UNKNOWN.name


class _Call:
    """One RPC being measured."""

    __slots__ = ("_done", "_labels", "_metrics", "_start")

    def __init__(self, metrics: GrpcServerMetrics, labels: tuple[str, str, str]) -> None:
        self._metrics, self._labels = metrics, labels
        self._done = False
        self._start = time.perf_counter()
        try:
            metrics.started.labels(*labels).inc()
        except Exception:
            log.exception("grpc_metrics_failed", method=labels[2])

    def finish(self, code: str) -> None:
        if self._done:
            return
        self._done = True
        elapsed = time.perf_counter() - self._start
        try:
            self._metrics.handled.labels(*self._labels, code).inc()
            self._metrics.handling.labels(*self._labels).observe(elapsed)
        except Exception:
            log.exception("grpc_metrics_failed", method=self._labels[2])


class GrpcServerMetrics(WrappingInterceptor):
    """Counts and times every RPC the server handles, refused ones included.

    Each handler is rewrapped as the same kind of callable (coroutine, async generator,
    plain function or generator), with its deserializer and serializer untouched, so
    the server runs it exactly as before; the status comes from how it ended: the code
    ``context.abort`` or ``context.set_code`` left, ``CANCELLED`` (or
    ``DEADLINE_EXCEEDED``) when gRPC cancelled it, ``UNKNOWN`` for any other exception.

    One blind spot, gRPC Python's: when a client cancels a stream whose handler is
    waiting in ``context.read()``, the read returns EOF as for a clean half-close, so a
    handler that then returns (an agent's ``Connect`` whose laptop went away) is ``OK``.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.started = Counter(
            "killswitch_grpc_server_started",
            "RPCs started on the server.",
            _LABELS,
            registry=registry,
        )
        self.handled = Counter(
            "killswitch_grpc_server_handled",
            "RPCs completed on the server, by gRPC status code.",
            [*_LABELS, "grpc_code"],
            registry=registry,
        )
        self.handling = Histogram(
            "killswitch_grpc_server_handling_seconds",
            "Time from the start of an RPC to its end (a stream's whole life).",
            _LABELS,
            buckets=GRPC_HANDLING_BUCKETS,
            registry=registry,
        )

    def _wrap(self, full_method: str, handler: Handler) -> Handler:
        service, method = _split_method(full_method)
        kind = _GRPC_TYPES[(bool(handler.request_streaming), bool(handler.response_streaming))]
        return _rewrap(handler, self._measured((kind, service, method), handler))

    def _measured(self, labels: tuple[str, str, str], handler: Handler) -> Callable[..., Any]:
        behaviour: Any = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )
        if inspect.isasyncgenfunction(behaviour):
            return self._async_generator(labels, behaviour)
        if inspect.iscoroutinefunction(behaviour):
            return self._coroutine(labels, behaviour)
        if handler.response_streaming:
            return self._generator(labels, behaviour)
        return self._function(labels, behaviour)

    def _coroutine(
        self, labels: tuple[str, str, str], behaviour: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        async def measured(request: Any, context: Any) -> Any:
            call = _Call(self, labels)
            try:
                result = await behaviour(request, context)
            except BaseException as exc:
                call.finish(_failure_code(exc, context))
                raise
            call.finish(_code_name(context, grpc.StatusCode.OK))
            return result

        return measured

    def _async_generator(
        self, labels: tuple[str, str, str], behaviour: Callable[..., AsyncGenerator[Any, None]]
    ) -> Callable[..., AsyncIterator[Any]]:
        async def measured(request: Any, context: Any) -> AsyncIterator[Any]:
            call = _Call(self, labels)
            try:
                async with aclosing(behaviour(request, context)) as responses:
                    async for response in responses:
                        yield response
            except BaseException as exc:
                call.finish(_failure_code(exc, context))
                raise
            call.finish(_code_name(context, grpc.StatusCode.OK))

        return measured

    # Synchronous handlers run on the server's thread pool; prometheus_client is thread-safe.
    def _function(
        self, labels: tuple[str, str, str], behaviour: Callable[..., Any]
    ) -> Callable[..., Any]:
        def measured(request: Any, context: Any) -> Any:
            call = _Call(self, labels)
            try:
                result = behaviour(request, context)
            except BaseException:
                call.finish(_code_name(context, grpc.StatusCode.UNKNOWN))
                raise
            call.finish(_code_name(context, grpc.StatusCode.OK))
            return result

        return measured

    def _generator(
        self, labels: tuple[str, str, str], behaviour: Callable[..., Iterable[Any]]
    ) -> Callable[..., Iterator[Any]]:
        def measured(request: Any, context: Any) -> Iterator[Any]:
            call = _Call(self, labels)
            try:
                yield from behaviour(request, context)
            except GeneratorExit:
                call.finish(grpc.StatusCode.CANCELLED.name)
                raise
            except BaseException:
                call.finish(_code_name(context, grpc.StatusCode.UNKNOWN))
                raise
            call.finish(_code_name(context, grpc.StatusCode.OK))

        return measured


def _rewrap(handler: Handler, behaviour: Callable[..., Any]) -> Handler:
    """The same handler running ``behaviour``; (de)serializers kept exactly as found."""
    make: Callable[..., Handler]
    if handler.unary_unary:
        make = grpc.unary_unary_rpc_method_handler
    elif handler.unary_stream:
        make = grpc.unary_stream_rpc_method_handler
    elif handler.stream_unary:
        make = grpc.stream_unary_rpc_method_handler
    else:
        make = grpc.stream_stream_rpc_method_handler
    return make(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
