"""Audit records of what people (and the system) did, stamped with the plane's clock.

Every service that changes shared state (holds, requests, runs, certificates) builds
its audit records here, so they all name the actor and role the same way; the record
rides in the transaction of the change it describes.
"""

from __future__ import annotations

from collections.abc import Callable

from control.domain import HoldDraft
from control.domain.audit import AuditRecord
from control.domain.identity import Principal
from control.store import Store


class AuditRecorder:
    def __init__(self, store: Store, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock

    def record(
        self,
        by: Principal,
        action: str,
        *,
        target: str = "",
        reason: str = "",
        ticket: str = "",
        result: str = "ok",
        detail: str = "",
    ) -> AuditRecord:
        actor = by.name if by.authenticated else f"unverified:{by.name}"
        return AuditRecord(
            self._clock(), actor, by.role.value, action, target, reason, ticket, result, detail
        )

    def hold_created(self, by: Principal, draft: HoldDraft, *, detail: str = "") -> AuditRecord:
        return self.record(
            by,
            "hold.create",
            target=f"{draft.id} {draft.kind.value} {draft.scope.describe()}",
            reason=draft.reason,
            ticket=draft.ticket,
            detail=detail,
        )

    async def append(self, record: AuditRecord) -> None:
        """An action that changed nothing else (a denial, a failure)."""
        await self._store.append_audit([record])
