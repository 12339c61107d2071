"""History: which finished holds, resume requests and runs may leave the hot path.

Every connect, resync and NOTIFY used to walk the whole history of lifted holds,
decided requests and ended runs. Those older than the retention period are archived
by the store (they stay in the database and, in full, in the audit log); these
predicates say which, and the stores' SQL says the same thing (``control.store.history``).
"""

from __future__ import annotations

from control.domain.approvals import OPEN_STATES
from control.domain.approvals import ResumeRequest
from control.domain.approvals import ResumeState
from control.domain.holds import Hold
from control.domain.rollout import ACTIVE_RUN_STATES
from control.domain.rollout import Run
from control.domain.rollout import RunState

# A week: longer than the longest a resume request may stay open (its maximum TTL), and
# an incident's review usually falls within it; `requests list --all` and `runbook list`
# show that window, the audit log everything.
DEFAULT_HISTORY_RETENTION_SECONDS = 7 * 24 * 3600.0
# Shorter and a replica whose resync lags could miss a lift before it is archived; an
# operator would see a request vanish while still discussing it.
MIN_HISTORY_RETENTION_SECONDS = 3600.0
MAX_HISTORY_RETENTION_SECONDS = 10 * 365 * 24 * 3600.0

DECIDED_REQUEST_STATES = frozenset(set(ResumeState) - OPEN_STATES)
FINISHED_RUN_STATES = frozenset(set(RunState) - ACTIVE_RUN_STATES)


def check_history_retention(seconds: float) -> float:
    """The ``serve --history-retention`` value, or why not."""
    if not MIN_HISTORY_RETENTION_SECONDS <= seconds <= MAX_HISTORY_RETENTION_SECONDS:
        raise ValueError(
            f"must be {MIN_HISTORY_RETENTION_SECONDS:.0f} seconds (an hour) or more, and at"
            f" most {MAX_HISTORY_RETENTION_SECONDS:.0f} (ten years)"
        )
    return seconds


def hold_archivable(hold: Hold, before: float) -> bool:
    return hold.lifted_at is not None and hold.lifted_at < before


def request_closed_at(request: ResumeRequest) -> float:
    """When it was decided (denied, executed), or when it expires (or expired) if open."""
    if request.state in OPEN_STATES:
        return request.expires_at
    return request.created_at if request.decided_at is None else request.decided_at


def request_archivable(request: ResumeRequest, before: float) -> bool:
    return request_closed_at(request) < before


def run_archivable(run: Run, before: float) -> bool:
    return not run.active and run.ended_at is not None and run.ended_at < before
