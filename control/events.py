"""What the plane reports as it happens, for metrics and per-laptop timelines, and
the one guard every observer is called through.

The plane calls one ``PlaneObserver``; adapters (Prometheus metrics, the
dashboard's timeline, the runbook runner) subclass it and override what they need.
Observers run on the event loop inside the plane's hot paths (every ack, every
heartbeat), so they must be cheap, and an observer's bug must never break an ack:
they are called through ``ObserverFailures.guarded`` (``Observers`` for the plane's,
the ingest sink for its own), which swallows the exception, logs it once per observer
and event, and counts it.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import ParamSpec

import structlog

from control.domain import Hold
from control.domain import Mode

log = structlog.get_logger("killswitch.events")

_P = ParamSpec("_P")


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


# The events, by name: what ``Observers`` fans out.
PLANE_EVENTS = tuple(name for name in vars(PlaneObserver) if not name.startswith("_"))


class ObserverFailures:
    """The one place an observer's exception stops: never in the caller's path.

    Logged with its traceback once per observer and event (a bug in the hot path would
    otherwise log a thousand times a second), and counted per observer: the server
    exports the count as ``killswitch_observer_failures_total``.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._logged: set[tuple[str, str]] = set()

    def guarded(
        self, event: str, observers: Sequence[tuple[str, Callable[_P, None]]]
    ) -> Callable[_P, None]:
        """One call that makes each ``(name, call)`` of ``observers`` in turn and never
        raises: their failures are logged and counted here."""

        def never_raising(*args: _P.args, **kwargs: _P.kwargs) -> None:
            for observer, call in observers:
                try:
                    call(*args, **kwargs)
                except Exception:
                    self._failed(observer, event)

        return never_raising

    def _failed(self, observer: str, event: str) -> None:
        self.counts[observer] = self.counts.get(observer, 0) + 1
        if (observer, event) not in self._logged:
            self._logged.add((observer, event))
            log.exception("observer_failed", observer=observer, hook=event)


def name_of(call: Callable[..., Any]) -> str:
    """How the guard names an observer that is a bare callback, in its log and count."""
    return str(getattr(call, "__qualname__", type(call).__name__))


class Observers(PlaneObserver):
    """The plane's observers behind the one guard: each event goes to every observer
    that overrides it, each call guarded, and to no one else.

    The methods are bound once, here: an event calls in turn, each guarded, the
    observers that hear it, and one nobody hears stays the base class's no-op.
    """

    def __init__(
        self, observers: Sequence[PlaneObserver], failures: ObserverFailures | None = None
    ) -> None:
        self.failures = failures or ObserverFailures()
        self._bind(observers)

    def _bind(self, observers: Sequence[PlaneObserver]) -> None:
        for event in PLANE_EVENTS:
            hearing = [
                (type(o).__name__, getattr(o, event))
                for o in observers
                if getattr(type(o), event) is not getattr(PlaneObserver, event)
            ]
            if hearing:
                setattr(self, event, self.failures.guarded(event, hearing))


class DeferredObservers(Observers):
    """The plane's observers when they need the plane built first.

    The runbook runner drives the plane and hears of its hold changes; the dashboard reads
    the plane and keeps the timeline of its events. So the plane is given this at
    construction, and the composition root names its observers once (``fill``), after
    building them and before anything starts: the plane emits no event before its start.
    """

    def __init__(self) -> None:
        super().__init__(())
        self._filled = False

    def fill(self, observers: Sequence[PlaneObserver]) -> None:
        if self._filled:
            raise RuntimeError("the plane's observers are named once")
        self._bind(observers)
        self._filled = True
