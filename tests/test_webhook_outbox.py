"""The webhook outbox on both stores: queued with the audit entry, claimed once, kept
until delivered, repeats collapsed, delivered rows pruned."""

from __future__ import annotations

from control.store import Store
from control.store.outbox import OutboxMessage
from control.webhooks.config import EVENTS
from control.webhooks.config import Webhook
from control.webhooks.events import WebhookFeed
from tests.store_contract import Backend
from tests.store_contract import draft
from tests.store_contract import record
from tests.store_contract import run_with_store

FEED = WebhookFeed([Webhook("chat", "http://127.0.0.1:9/x", frozenset(EVENTS), b"k" * 16)])


def test_an_audited_event_is_queued_in_its_transaction_and_claimed_once(
    backend: Backend,
) -> None:
    async def body(store: Store) -> None:
        store.outbox_feed = FEED.from_audit
        hold = draft("hold-1")
        await store.create_hold(hold, record("hold.create", target="hold-1 incident all agents"))
        await store.append_audit([record("certs.revoke")])  # no event
        claimed = await store.claim_webhooks(now=2000.0, until=2060.0, limit=10)
        assert [(m.event, m.webhook) for m in claimed] == [("pause_issued", "chat")]
        assert await store.claim_webhooks(now=2001.0, until=2061.0, limit=10) == []
        # Not delivered: due again once the claim runs out, then after the retry delay.
        await store.webhook_retry(claimed[0].id, next_at=2100.0, error="HTTP 500")
        assert await store.claim_webhooks(now=2099.0, until=2160.0, limit=10) == []
        again = await store.claim_webhooks(now=2100.0, until=2160.0, limit=10)
        assert [(m.event_id, m.attempts) for m in again] == [(claimed[0].event_id, 1)]
        await store.webhook_delivered(again[0].id, now=2101.0)
        assert await store.claim_webhooks(now=9999.0, until=9999.0, limit=10) == []
        assert await store.prune_webhooks(delivered_before=2101.0) == 0
        assert await store.prune_webhooks(delivered_before=2102.0) == 1

    run_with_store(backend, body)


def test_the_same_event_queued_twice_is_kept_once(backend: Backend) -> None:
    message = OutboxMessage("fleet-compliant-3", "chat", "fleet_compliant", "{}", 1000.0)

    async def body(store: Store) -> None:
        await store.enqueue_webhooks([message])
        await store.enqueue_webhooks([message])  # another replica saw it too
        claimed = await store.claim_webhooks(now=1000.0, until=1060.0, limit=10)
        assert [m.event_id for m in claimed] == ["fleet-compliant-3"]

    run_with_store(backend, body)
