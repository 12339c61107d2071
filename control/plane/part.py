"""What the parts that take in agents' state share."""

from __future__ import annotations

from collections.abc import Callable

from control.domain import CompliancePolicy
from control.plane.cache import DesiredStateCache
from control.plane.writer import AgentWriter
from control.store import Store


class AgentStatePart:
    """A part that reads and changes agents' entries: the cache's entries and the
    writer's dirty set are kept as attributes of their own, because the hot paths
    (an ack, a heartbeat) reach them on every message."""

    def __init__(
        self,
        store: Store,
        cache: DesiredStateCache,
        writer: AgentWriter,
        *,
        clock: Callable[[], float],
        policy: CompliancePolicy,
    ) -> None:
        self._store = store
        self._cache = cache
        self._agents = cache.agents
        self._writer = writer
        self._dirty = writer.dirty
        self._clock = clock
        self._policy = policy
