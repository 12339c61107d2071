"""The compliance dashboard: placeholder wiring, filled in by the dashboard work."""

from __future__ import annotations

from aiohttp import web

from control.events import PlaneObserver
from control.plane import ControlPlane
from control.web.sessions import DashboardSessions


class Dashboard:
    def __init__(self, plane: ControlPlane, sessions: DashboardSessions) -> None:
        self._plane = plane
        self._sessions = sessions
        self.timeline = PlaneObserver()

    def routes(self) -> list[web.RouteDef]:
        return []
