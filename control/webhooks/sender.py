"""Drains the webhook outbox: signed POSTs, retried with exponential backoff.

It runs beside the control path and never in it: events are queued in the store by
the transactions that make them (or, for the fleet turning compliant, by the watch
here), and this task delivers them when it can. A receiver that is down costs
retries, never a pause. Rows survive restarts, so a receiver that comes back after
the server did still gets every event, at least once.

Each request is signed: ``X-Killswitch-Signature: t=UNIX_TIME,v1=HEX`` where HEX is
HMAC-SHA256 with the webhook's secret over ``"{t}." + body``; a receiver recomputes it
and refuses old timestamps. Redirects are not followed: only the URL the operator
configured is ever called.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import time
from collections.abc import Callable
from collections.abc import Sequence

import aiohttp
import structlog

from control.domain import HoldKind
from control.errors import KillswitchError
from control.lifecycle import cancel_and_wait
from control.plane import ControlPlane
from control.store import Store
from control.store.outbox import ClaimedMessage
from control.webhooks.config import Webhook
from control.webhooks.events import WebhookFeed

log = structlog.get_logger("killswitch.webhooks")

POLL_SECONDS = 1.0
BATCH = 50
REQUEST_TIMEOUT_SECONDS = 10.0
# A claimed row is not claimed again (by another replica) before this.
CLAIM_SECONDS = 60.0
FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 300.0
SIGNATURE_HEADER = "X-Killswitch-Signature"
# plane.status() walks every agent: asked at most this often, and only under a pause.
COMPLIANCE_EVERY_SECONDS = 5.0
# Delivered rows are kept this long for inspection, then pruned (checked hourly).
KEEP_DELIVERED_SECONDS = 7 * 86_400.0
PRUNE_EVERY_SECONDS = 3_600.0


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def retry_delay(attempts: int, rng: random.Random) -> float:
    """Exponential from one second, capped at five minutes, with jitter so that many
    rows failing together do not retry together."""
    base = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2.0 ** min(attempts, 16))
    return base * rng.uniform(0.75, 1.25)


class WebhookSender:
    def __init__(
        self,
        store: Store,
        plane: ControlPlane,
        webhooks: Sequence[Webhook],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._plane = plane
        self._webhooks = {hook.name: hook for hook in webhooks}
        self.feed = WebhookFeed(webhooks)
        self._clock = clock
        self._rng = random.Random()
        self._task: asyncio.Task[None] | None = None
        # The newest epoch whose compliant fleet was announced by this replica.
        self._announced_epoch = 0
        self._compliance_checked_at = -COMPLIANCE_EVERY_SECONDS
        self._pruned_at = -PRUNE_EVERY_SECONDS

    def start(self) -> None:
        self._store.outbox_feed = self.feed.from_audit
        self._task = asyncio.create_task(self._run(), name="webhooks")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                claimed: list[ClaimedMessage] = []
                try:
                    await self._housekeeping()
                    claimed = await self._store.claim_webhooks(
                        self._clock(), self._clock() + CLAIM_SECONDS, BATCH
                    )
                    by_webhook: dict[str, list[ClaimedMessage]] = {}
                    for message in claimed:
                        by_webhook.setdefault(message.webhook, []).append(message)
                    await asyncio.gather(
                        *(self._deliver_in_order(session, queue) for queue in by_webhook.values())
                    )
                except KillswitchError as exc:
                    # The store is down: claimed rows come due again after CLAIM_SECONDS.
                    log.warning("webhook_outbox_unavailable", error=str(exc))
                except Exception:
                    # A bug here must not end deliveries for the server's lifetime.
                    log.exception("webhook_sender_failed")
                if len(claimed) < BATCH:
                    await asyncio.sleep(POLL_SECONDS)

    async def _housekeeping(self) -> None:
        now = self._clock()
        if now - self._compliance_checked_at >= COMPLIANCE_EVERY_SECONDS:
            self._compliance_checked_at = now
            await self._announce_compliance()
        if now - self._pruned_at >= PRUNE_EVERY_SECONDS:
            self._pruned_at = now
            pruned = await self._store.prune_webhooks(now - KEEP_DELIVERED_SECONDS)
            if pruned:
                log.info("webhook_outbox_pruned", rows=pruned)

    async def _announce_compliance(self) -> None:
        """The fleet is compliant again under an incident pause: once per epoch (another
        replica's announcement of the same epoch is the same event id, kept once)."""
        epoch = self._plane.epoch
        if epoch <= self._announced_epoch:
            return
        incidents = [h for h in self._plane.active_holds() if h.kind is HoldKind.INCIDENT]
        if not incidents:
            return
        summary = self._plane.status()
        if not summary.compliant or not summary.total:
            return
        self._announced_epoch = epoch
        fields = {
            "detail": f"{summary.total} laptops, every paused one proven stopped",
            "target": ", ".join(h.id for h in incidents),
            "ticket": ", ".join(sorted({h.ticket for h in incidents if h.ticket})),
            "epoch": str(epoch),
        }
        messages = self.feed.messages(
            "fleet_compliant", f"fleet-compliant-{epoch}", self._clock(), fields
        )
        if messages:
            await self._store.enqueue_webhooks(messages)

    async def _deliver_in_order(
        self, session: aiohttp.ClientSession, queue: list[ClaimedMessage]
    ) -> None:
        """One webhook's messages oldest first, so a chat reads in order; webhooks in
        parallel, so one slow receiver does not hold up the others."""
        for message in queue:
            await self._deliver(session, message)

    async def _deliver(self, session: aiohttp.ClientSession, message: ClaimedMessage) -> None:
        hook = self._webhooks.get(message.webhook)
        if hook is None:  # configured before this start, not now: kept for a later one
            await self._retry(message, "webhook no longer configured", MAX_RETRY_SECONDS)
            return
        body = message.body.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "killswitch-webhooks",
            "X-Killswitch-Event": message.event,
            "X-Killswitch-Delivery": message.event_id,
            SIGNATURE_HEADER: signature(hook.secret, int(self._clock()), body),
        }
        try:
            async with session.post(
                hook.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            await self._retry(message, f"{type(exc).__name__}: {exc}")
            return
        if 200 <= status < 300:
            await self._store.webhook_delivered(message.id, self._clock())
            log.info(
                "webhook_delivered", webhook=hook.name, kind=message.event, id=message.event_id
            )
        else:
            await self._retry(message, f"HTTP {status}")

    async def _retry(self, message: ClaimedMessage, error: str, delay: float | None = None) -> None:
        wait = retry_delay(message.attempts, self._rng) if delay is None else delay
        log.warning(
            "webhook_not_delivered",
            webhook=message.webhook,
            kind=message.event,
            id=message.event_id,
            attempts=message.attempts + 1,
            retry_in=round(wait, 1),
            error=error,
        )
        await self._store.webhook_retry(message.id, self._clock() + wait, error[:500])
