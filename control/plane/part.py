"""What the parts that work on agents' entries share."""

from __future__ import annotations

from control.plane.cache import DesiredStateCache
from control.plane.context import PlaneContext
from control.plane.context import PlanePart
from control.plane.writer import AgentWriter


class CachePart(PlanePart):
    """A part that reads the desired-state cache: the cache's entries are kept as an
    attribute of their own, because the hot paths (an ack, a heartbeat, a lease, a
    census) reach them on every call."""

    def __init__(self, context: PlaneContext, cache: DesiredStateCache) -> None:
        super().__init__(context)
        self._cache = cache
        self._agents = cache.agents


class AgentStatePart(CachePart):
    """A part that also changes agents' entries: the writer's dirty set is kept as an
    attribute of its own, for the same reason."""

    def __init__(
        self, context: PlaneContext, cache: DesiredStateCache, writer: AgentWriter
    ) -> None:
        super().__init__(context, cache)
        self._writer = writer
        self._dirty = writer.dirty
