"""The webhook outbox: events waiting for delivery, durable across restarts.

Rows are written in the same transaction as the audit entries that describe the
events (``Store.outbox_feed``), so an event that happened is never lost to a crash,
and one per (event id, webhook): enqueueing the same event twice (two replicas seeing
the fleet turn compliant) keeps one. A sender claims due rows by moving their next
attempt forward, so two replicas rarely send the same row; delivery is at least once,
and every body names its event id for the receiver to drop repeats.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The same schema for SQLite and PostgreSQL but for the key's type; safe to run twice.
MIGRATION = """
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id {key},
    event_id TEXT NOT NULL,
    webhook TEXT NOT NULL,
    event TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    delivered_at DOUBLE PRECISION,
    last_error TEXT NOT NULL DEFAULT '',
    UNIQUE (event_id, webhook)
);
CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox (next_attempt_at)
    WHERE delivered_at IS NULL;
"""
SQLITE_MIGRATION = MIGRATION.format(key="INTEGER PRIMARY KEY AUTOINCREMENT")
POSTGRES_MIGRATION = MIGRATION.format(key="BIGSERIAL PRIMARY KEY")

# Written with :name parameters (SQLite's); ``for_postgres`` turns them into psycopg's.
ENQUEUE = """
INSERT INTO webhook_outbox (event_id, webhook, event, body, created_at, next_attempt_at)
VALUES (:event_id, :webhook, :event, :body, :created_at, :created_at)
ON CONFLICT (event_id, webhook) DO NOTHING
"""
# {lock}: PostgreSQL skips rows another sender is claiming (transaction.Statements).
CLAIM = """
UPDATE webhook_outbox SET next_attempt_at = :until
WHERE id IN (
    SELECT id FROM webhook_outbox WHERE delivered_at IS NULL AND next_attempt_at <= :now
    ORDER BY id LIMIT :limit{lock}
)
RETURNING id, event_id, webhook, event, body, attempts
"""
DELIVERED = """
UPDATE webhook_outbox SET delivered_at = :now, attempts = attempts + 1, last_error = ''
WHERE id = :id
"""
RETRY = """
UPDATE webhook_outbox SET attempts = attempts + 1, next_attempt_at = :next_at,
    last_error = :error
WHERE id = :id AND delivered_at IS NULL
"""

# Delivered rows are kept a while for inspection, then deleted (``Store.prune_webhooks``).
PRUNE = "DELETE FROM webhook_outbox WHERE delivered_at < :before"


def for_postgres(sql: str) -> str:
    return re.sub(r":(\w+)", r"%(\1)s", sql)


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One event for one webhook: ``body`` is the JSON to POST, exactly."""

    event_id: str
    webhook: str
    event: str
    body: str
    created_at: float

    def params(self) -> dict[str, object]:
        return {
            "event_id": self.event_id,
            "webhook": self.webhook,
            "event": self.event,
            "body": self.body,
            "created_at": self.created_at,
        }


@dataclass(frozen=True, slots=True)
class ClaimedMessage:
    id: int
    event_id: str
    webhook: str
    event: str
    body: str
    attempts: int
