"""Prometheus metrics: counters and histograms fed by plane events, gauges read at scrape."""

from __future__ import annotations

from typing import Any

import grpc
from aiohttp import web

from control.events import PlaneObserver
from control.plane import ControlPlane


class Metrics(PlaneObserver):
    """Placeholder wiring; filled in by the metrics work."""

    def watch(self, plane: ControlPlane) -> None:
        del plane

    def interceptor(self) -> grpc.aio.ServerInterceptor:  # type: ignore[type-arg]
        raise NotImplementedError

    def routes(self) -> list[web.RouteDef]:
        return []

    def _unused(self) -> Any:
        return None
