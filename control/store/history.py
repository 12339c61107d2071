"""The SQL of history compaction, written once for both stores.

Finished rows are not moved to other tables but marked: ``archived_at`` is set, and
every hot read (``load``, ``load_shared``) asks for ``archived_at IS NULL`` through a
partial index that holds only the hot rows. Marking rather than moving keeps each id
unique across all of history with no second table to check: a lift of an archived
hold, a decision on an archived request or a step of an archived run is refused by
the same checks as before, and nothing is ever copied twice or lost halfway.

What may be archived is ``control.domain.history``'s rule, said again in SQL here.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable

from control.domain.approvals import OPEN_STATES
from control.domain.history import DECIDED_REQUEST_STATES
from control.domain.history import FINISHED_RUN_STATES
from control.store import codec

# Placeholder for a named parameter: ":name" (SQLite) or "%(name)s" (psycopg).
Param = Callable[[str], str]

HOT = "archived_at IS NULL"


def _listed(states: Iterable[str]) -> str:
    return ", ".join(f"'{state}'" for state in sorted(states))


def archive_batches(p: Param, lock: str) -> tuple[str, str, str]:
    """One statement per table, archiving at most ``limit`` finished rows older than
    ``before`` (parameters ``now``, ``before``, ``limit``). Each row is archived once
    however many compactors run: ``lock`` lets PostgreSQL's skip rows another is
    archiving, and the outer condition skips rows it archived meanwhile."""

    def batch(table: str, finished: str, order: str) -> str:
        # The batch is chosen once (MATERIALIZED): as a plain subquery PostgreSQL may
        # evaluate it again while updating, and archive more than ``limit`` rows.
        return (
            f"WITH batch AS MATERIALIZED (SELECT id FROM {table} WHERE {HOT} AND ({finished})"
            f" ORDER BY {order} LIMIT {p('limit')}{lock})"
            f" UPDATE {table} SET archived_at = {p('now')}"
            f" WHERE {HOT} AND id IN (SELECT id FROM batch)"
        )

    before = p("before")
    decided = (
        f"state IN ({_listed(DECIDED_REQUEST_STATES)})"
        f" AND coalesce(decided_at, created_at) < {before}"
    )
    expired = f"state IN ({_listed(OPEN_STATES)}) AND expires_at < {before}"
    return (
        batch("holds", f"lifted_at < {before}", "created_epoch"),
        batch("resume_requests", f"({decided}) OR ({expired})", "created_at, id"),
        batch(
            "runbook_runs",
            f"state IN ({_listed(FINISHED_RUN_STATES)}) AND ended_at < {before}",
            "started_at, id",
        ),
    )


def hot_reads() -> tuple[str, str, str]:
    """What ``load_shared`` reads: the holds, requests and runs not archived."""
    return (
        f"{codec.select_sql('holds', codec.HOLD_COLUMNS)} WHERE {HOT} ORDER BY created_epoch, id",
        f"{codec.select_sql('resume_requests', codec.RESUME_COLUMNS)}"
        f" WHERE {HOT} ORDER BY created_at, id",
        f"SELECT run FROM runbook_runs WHERE {HOT} ORDER BY started_at, id",
    )


def archived_lookups(p: Param) -> tuple[str, str, str]:
    """One archived hold, request or run by ``id``."""
    archived = f"id = {p('id')} AND archived_at IS NOT NULL"
    return (
        f"{codec.select_sql('holds', codec.HOLD_COLUMNS)} WHERE {archived}",
        f"{codec.select_sql('resume_requests', codec.RESUME_COLUMNS)} WHERE {archived}",
        f"SELECT run FROM runbook_runs WHERE {archived}",
    )
