"""What the parts that work on agents' entries share."""

from __future__ import annotations

from control.plane.cache import DesiredStateCache
from control.plane.context import PlaneContext
from control.plane.context import PlanePart


class CachePart(PlanePart):
    """A part that reads the desired-state cache: the cache's entries are kept as an
    attribute of their own, because the hot paths (an ack, a heartbeat, a lease, a
    census) reach them on every call."""

    def __init__(self, context: PlaneContext, cache: DesiredStateCache) -> None:
        super().__init__(context)
        self._cache = cache
        self._agents = cache.agents


class AgentStatePart(CachePart):
    """A part that also changes agents' entries. It writes them through the cache's own
    writer, so that one dirty set holds every change; that set is kept as an attribute
    of its own, for the same reason as the entries."""

    def __init__(self, context: PlaneContext, cache: DesiredStateCache) -> None:
        super().__init__(context, cache)
        self._writer = cache.writer
        self._dirty = cache.writer.dirty
