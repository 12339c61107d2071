"""The gateway's standing copy of which agents may upload now (``Ingest.WatchUploads``).

Asking the control plane about every batch puts a cross-process round trip, on a
server busy with 10,000 agent streams, in every upload's path. Instead the plane pushes
which agents may upload (allowed, and until when their lease runs) several times a
second, and the gateway lets a batch in on that copy, locally, only while all of this
holds (Teleport's strict mode for locks, on a smaller scale):

- the copy was heard from within ``FRESH_SECONDS`` (the plane sends every 0.25 s, with
  or without changes); a silent or broken stream makes every batch ask again;
- the agent is in it, and its lease, on the plane's clock, has not run out;
- no event of the batch was captured later than ``CAPTURE_SLACK_SECONDS`` after the
  moment the copy describes. A pause committed after that moment is not in the copy
  yet; its batches carry events from after it, so they are asked about, and refused.

Everything else (paused, lease-less, unknown agents, stale copy) goes to
``Ingest.AuthorizeBatches`` as before, which keeps every refusal counted and every
violation recorded by the plane. So an event accepted on the copy was captured at most
``CAPTURE_SLACK_SECONDS`` after a moment the plane said its agent was allowed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# The plane sends every WATCH_TICK_SECONDS (0.25 s): four missed messages and the copy
# is not used.
FRESH_SECONDS = 1.0
# Below the drill's 2 s grace for agents that ignore their lease.
CAPTURE_SLACK_SECONDS = 1.0


class StandingCopy:
    def __init__(self) -> None:
        self._allowed: dict[str, float] = {}  # agent -> its lease's end (plane clock)
        self._as_of = -math.inf  # plane clock: the moment the copy describes
        self._heard_at = -math.inf  # gateway monotonic clock: when that was received

    def apply(
        self, as_of: float, full: bool, changes: Mapping[str, float | None], heard_at: float
    ) -> None:
        """One ``UploadStates`` message; ``None`` for an agent no longer allowed."""
        if full:
            self._allowed = {}
        for agent, until in changes.items():
            if until is None:
                self._allowed.pop(agent, None)
            else:
                self._allowed[agent] = until
        self._as_of, self._heard_at = as_of, heard_at

    def forget(self) -> None:
        """The stream is gone: nothing is let in on the copy until a new full one."""
        self._allowed = {}
        self._as_of = self._heard_at = -math.inf

    def allows(self, agent_id: str, last_event_at: float, now: float) -> bool:
        """May this batch land without asking? ``now`` on the gateway's monotonic clock."""
        since = now - self._heard_at
        if since > FRESH_SECONDS:
            return False
        until = self._allowed.get(agent_id)
        if until is None or self._as_of + since >= until:
            return False
        return last_event_at <= self._as_of + CAPTURE_SLACK_SECONDS

    def __len__(self) -> int:
        return len(self._allowed)
