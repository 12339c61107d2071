"""Which audited actions are webhook events, and the JSON body each one is sent as.

The body is Slack-compatible (a ``text`` line a chat tool shows as it is) and carries
the structured fields beside it, with the event ``id`` a receiver uses to drop the
repeats that at-least-once delivery allows.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from control.domain.audit import RESULT_OK
from control.domain.audit import AuditEntry
from control.store.outbox import OutboxMessage
from control.webhooks.config import Webhook

# Audit action -> event; hold.create only for incident holds (see ``event_of``).
EVENT_OF_ACTION = {
    "hold.create": "pause_issued",
    "resume.request": "resume_requested",
    "resume.approve": "resume_approved",
    "resume.deny": "resume_denied",
    "agent.violation": "violation",
    "runbook.wave_start": "runbook_wave",
    "runbook.halt": "runbook_halt",
    "runbook.abort": "runbook_halt",
}
# What these actions are audited with when they happened (not "ok"), by the plane.
RESULT_OF_ACTION = {"agent.violation": "violation", "runbook.halt": "halted"}
HEADLINE = {
    "pause_issued": "Capture PAUSED",
    "resume_requested": "Resume requested",
    "resume_approved": "Resume approved",
    "resume_denied": "Resume denied",
    "fleet_compliant": "Fleet compliant",
    "violation": "VIOLATION",
    "runbook_wave": "Runbook wave started",
    "runbook_halt": "Runbook HALTED",
}


def event_of(entry: AuditEntry) -> str:
    """The webhook event an audit entry is, or ""; denied and failed actions are none."""
    record = entry.record
    event = EVENT_OF_ACTION.get(record.action, "")
    if record.result != RESULT_OF_ACTION.get(record.action, RESULT_OK):
        return ""  # denied or failed: nothing happened
    # "HOLD_ID KIND SCOPE": an opt-out or a runbook's own hold is no incident pause.
    if event == "pause_issued" and record.target.split(" ")[1:2] != ["incident"]:
        return ""
    return event


def body(event: str, event_id: str, at: float, fields: dict[str, str]) -> str:
    """The JSON posted: ``text`` for people, the rest for machines."""
    said = [HEADLINE[event]]
    if fields.get("actor"):
        said.append(f"by {fields['actor']}")
    line = " ".join(said)
    for key in ("target", "reason", "detail"):
        if fields.get(key):
            line += f" | {fields[key]}"
    if fields.get("ticket"):
        line += f" | ticket {fields['ticket']}"
    occurred = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
    document = {
        "text": f"killswitch: {line}",
        "id": event_id,
        "event": event,
        "occurred_at": occurred,
        **fields,
    }
    return json.dumps(document, sort_keys=True, ensure_ascii=False)


class WebhookFeed:
    """Turns events into one outbox message per interested webhook."""

    def __init__(self, webhooks: Sequence[Webhook]) -> None:
        self._webhooks = tuple(webhooks)

    def messages(
        self, event: str, event_id: str, at: float, fields: dict[str, str]
    ) -> list[OutboxMessage]:
        text = body(event, event_id, at, fields)
        return [
            OutboxMessage(event_id, hook.name, event, text, at)
            for hook in self._webhooks
            if event in hook.events
        ]

    def from_audit(self, entries: Sequence[AuditEntry]) -> list[OutboxMessage]:
        """The store's ``outbox_feed``: runs inside the audit entries' transaction."""
        messages: list[OutboxMessage] = []
        for entry in entries:
            event = event_of(entry)
            if not event:
                continue
            record = entry.record
            fields = {
                "actor": record.actor,
                "role": record.role,
                "target": record.target,
                "reason": record.reason,
                "ticket": record.ticket,
                "detail": record.detail,
                "audit_seq": str(entry.seq),
            }
            messages += self.messages(event, f"audit-{entry.seq}", record.at, fields)
        return messages
