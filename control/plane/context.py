"""What every part of the plane is built with.

``ControlPlane`` makes one ``PlaneContext`` and hands it to each part, so the store,
the clock, the audit recorder, the compliance policy, the observer and the lease TTL
are chosen in one place, and each part's constructor names only what is its own: the other parts it
works with and its own intervals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from control.domain import CompliancePolicy
from control.events import PlaneObserver
from control.plane.audit import AuditRecorder
from control.store import Store


@dataclass(frozen=True, slots=True, kw_only=True)
class PlaneContext:
    store: Store
    clock: Callable[[], float]
    # Stamps audit records with the same clock; shared with the services outside the
    # plane (``ControlPlane.audit``).
    audit: AuditRecorder
    policy: CompliancePolicy
    # Who hears of acks, proofs of stop, hold changes: always the guard (``Observers``),
    # so that no observer can break an ack.
    observer: PlaneObserver
    lease_ttl: float
    # How this process signs its agent rows and its beats.
    replica_id: str


class PlanePart:
    """A part of the plane. What the hot paths (an ack, a heartbeat, a census) reach on
    every message is kept as attributes of their own, one lookup away; the rest is
    reached through the context."""

    def __init__(self, context: PlaneContext) -> None:
        self._context = context
        self._clock = context.clock
        self._policy = context.policy
        self.observer = context.observer
