"""What the plane reports as it happens, for metrics and per-laptop timelines.

The plane calls one ``PlaneObserver``; adapters (Prometheus metrics, the
dashboard's timeline) subclass it and override what they need. Observers run
on the event loop inside the plane's hot paths, so they must be cheap and must
never raise.
"""

from __future__ import annotations

from collections.abc import Sequence

from control.domain import Hold, Mode


class PlaneObserver:
    """Every method is a no-op: override the events you care about."""

    def connected(self, agent_id: str, *, reconnect: bool, at: float) -> None: ...

    def disconnected(self, agent_id: str, *, at: float) -> None: ...

    def directive_sent(self, agent_id: str, *, epoch: int, mode: Mode, at: float) -> None: ...

    def acked(
        self, agent_id: str, *, epoch: int, mode: Mode, latency: float | None, at: float
    ) -> None:
        """``latency``: seconds since the agent's desired state last changed, if this ack is
        for that change (a re-ack of an older epoch has none)."""

    def nacked(self, agent_id: str, *, epoch: int, reason: str, at: float) -> None: ...

    def heartbeat(self, agent_id: str, *, at: float) -> None: ...

    def verified(self, agent_id: str, *, epoch: int, latency: float, at: float) -> None:
        """A paused agent was proven stopped, ``latency`` seconds after its pause."""

    def violation(self, agent_id: str, *, evidence: str, at: float) -> None: ...

    def upload_refused(self, agent_id: str, *, reason: str, at: float) -> None: ...

    def hold_changed(self, hold: Hold, *, epoch: int, at: float) -> None: ...


class Observers(PlaneObserver):
    """Fans every event out to several observers."""

    def __init__(self, observers: Sequence[PlaneObserver]) -> None:
        self._observers = tuple(observers)

    def connected(self, agent_id: str, *, reconnect: bool, at: float) -> None:
        for o in self._observers:
            o.connected(agent_id, reconnect=reconnect, at=at)

    def disconnected(self, agent_id: str, *, at: float) -> None:
        for o in self._observers:
            o.disconnected(agent_id, at=at)

    def directive_sent(self, agent_id: str, *, epoch: int, mode: Mode, at: float) -> None:
        for o in self._observers:
            o.directive_sent(agent_id, epoch=epoch, mode=mode, at=at)

    def acked(
        self, agent_id: str, *, epoch: int, mode: Mode, latency: float | None, at: float
    ) -> None:
        for o in self._observers:
            o.acked(agent_id, epoch=epoch, mode=mode, latency=latency, at=at)

    def nacked(self, agent_id: str, *, epoch: int, reason: str, at: float) -> None:
        for o in self._observers:
            o.nacked(agent_id, epoch=epoch, reason=reason, at=at)

    def heartbeat(self, agent_id: str, *, at: float) -> None:
        for o in self._observers:
            o.heartbeat(agent_id, at=at)

    def verified(self, agent_id: str, *, epoch: int, latency: float, at: float) -> None:
        for o in self._observers:
            o.verified(agent_id, epoch=epoch, latency=latency, at=at)

    def violation(self, agent_id: str, *, evidence: str, at: float) -> None:
        for o in self._observers:
            o.violation(agent_id, evidence=evidence, at=at)

    def upload_refused(self, agent_id: str, *, reason: str, at: float) -> None:
        for o in self._observers:
            o.upload_refused(agent_id, reason=reason, at=at)

    def hold_changed(self, hold: Hold, *, epoch: int, at: float) -> None:
        for o in self._observers:
            o.hold_changed(hold, epoch=epoch, at=at)


class DeferredObservers(Observers):
    """The plane's fan-out when its observers need the plane built first.

    The runbook runner drives the plane and hears of its hold changes; the dashboard reads
    the plane and keeps the timeline of its events. So the plane is given this fan-out at
    construction, and the composition root names its members once (``fill``), after
    building them and before anything starts: the plane emits no event before its start.
    """

    def __init__(self) -> None:
        super().__init__(())
        self._filled = False

    def fill(self, observers: Sequence[PlaneObserver]) -> None:
        if self._filled:
            raise RuntimeError("the plane's observers are named once")
        self._observers = tuple(observers)
        self._filled = True
