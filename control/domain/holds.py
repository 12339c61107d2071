"""Holds: durable reasons why capture must be paused on some scope."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from control.domain.release import Release
from control.domain.scope import Scope
from control.errors import InvalidInput
from control.errors import shown

MAX_REASON_CHARS = 500
MAX_TICKET_CHARS = 100


class HoldKind(StrEnum):
    """Why a hold exists, which decides who may lift it (an opt-out only its laptop's
    owner) and what a runbook run makes of it (a new incident hold halts the run)."""

    INCIDENT = "incident"
    OPT_OUT = "opt_out"
    ROLLOUT = "rollout"


@dataclass(frozen=True, slots=True)
class HoldDraft:
    """A validated request for a new hold; the store gives it an epoch."""

    id: str
    kind: HoldKind
    scope: Scope
    reason: str
    ticket: str
    created_by: str
    created_at: float
    # Quarantine unsent spool data on pause instead of deleting it.
    keep_spool: bool = False
    # Rollout holds only: the waves a runbook has re-enabled so far.
    release: Release | None = None

    def covers(self, agent_id: str, labels: Mapping[str, str]) -> bool:
        """In scope and not yet released by a runbook wave."""
        if not self.scope.covers(agent_id, labels):
            return False
        return self.release is None or not self.release.releases(agent_id, labels)


@dataclass(frozen=True, slots=True)
class Hold(HoldDraft):
    """A committed hold: the store allocated ``created_epoch`` (and ``lifted_epoch``)."""

    created_epoch: int = 0
    lifted_at: float | None = None
    lifted_by: str = ""
    lifted_epoch: int = 0

    @classmethod
    def committed(cls, draft: HoldDraft, epoch: int) -> Hold:
        return cls(
            id=draft.id,
            kind=draft.kind,
            scope=draft.scope,
            reason=draft.reason,
            ticket=draft.ticket,
            created_by=draft.created_by,
            created_at=draft.created_at,
            keep_spool=draft.keep_spool,
            release=draft.release,
            created_epoch=epoch,
        )

    @property
    def active(self) -> bool:
        return self.lifted_at is None


def opt_out_hold_id(agent_id: str) -> str:
    """A laptop's one opt-out hold: each opt-out re-activates it in place and each opt-in
    lifts it, so the holds table keeps one row per laptop however often its owner cycles
    (the audit log keeps every cycle)."""
    return f"opt-out-{agent_id}"


def reject_control_characters(text: str, what: str) -> None:
    """Terminal escapes in a stored reason would rewrite an operator's screen later."""
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise InvalidInput(f"{what} contains control characters")


def validate_reason(reason: str) -> str:
    """A pause without a reason cannot be explained to employees or a regulator later."""
    cleaned = " ".join(reason.split())
    reject_control_characters(cleaned, "reason")
    if not cleaned:
        raise InvalidInput("a reason is required and cannot be empty")
    if len(cleaned) > MAX_REASON_CHARS:
        raise InvalidInput(f"reason is too long ({len(cleaned)} chars); at most {MAX_REASON_CHARS}")
    return cleaned


def validate_ticket(ticket: str) -> str:
    cleaned = ticket.strip()
    reject_control_characters(cleaned, "ticket")
    if len(cleaned) > MAX_TICKET_CHARS or any(c.isspace() for c in cleaned):
        raise InvalidInput(
            f"invalid ticket {shown(ticket)}: no spaces, at most {MAX_TICKET_CHARS} chars"
        )
    return cleaned


def draft_hold(
    *,
    hold_id: str,
    kind: HoldKind,
    scope: Scope,
    reason: str,
    ticket: str,
    created_by: str,
    created_at: float,
    keep_spool: bool = False,
) -> HoldDraft:
    return HoldDraft(
        id=hold_id,
        kind=kind,
        scope=scope,
        reason=validate_reason(reason),
        ticket=validate_ticket(ticket),
        created_by=created_by,
        created_at=created_at,
        keep_spool=keep_spool,
    )
