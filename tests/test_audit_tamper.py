"""Tampering with the database file itself, as someone holding a copy of it would.

Each case writes real entries through the store, closes it, edits the SQLite file
with the ``sqlite3`` module (dropping the append-only triggers first), reopens it
and verifies what ``read_audit`` returns, page by page.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
import structlog

from control.domain.audit import AuditEntry
from control.domain.audit import ChainHead
from control.domain.audit import ChainProblem
from control.domain.audit import verify_anchor
from control.domain.audit import verify_chain
from control.domain.identity import CertificateRecord
from control.domain.identity import EnrollToken
from control.domain.identity import Role
from control.domain.identity import hash_secret
from control.store.sqlite import SqliteStore
from tests.test_sqlite_store import draft
from tests.test_sqlite_store import record

ENTRIES_WRITTEN = 6
# Small pages, so verification also crosses page boundaries.
PAGE_SIZE = 2


async def write_history(data_dir: Path) -> ChainHead:
    """Several kinds of action; returns the newest head as the server's log line showed it."""
    with structlog.testing.capture_logs() as logs:
        store = await SqliteStore.open(data_dir)
        await store.create_hold(draft("h1"), record("pause", target="h1"))
        await store.create_hold(draft("h2"), record("pause", target="h2"))
        await store.lift_hold("h1", "ic-2", 2000.0, record("resume", "ic-2", target="h1"))
        await store.append_audit([record("permission_denied", "eve", target="h2")])
        token = EnrollToken("t1", hash_secret("s"), 5, 9000.0, "sre-1", 1000.0)
        await store.create_enroll_token(token, record("token_created", "sre-1"))
        cert = CertificateRecord("01", "laptop-1", Role.AGENT, 9000.0, 1000.0)
        await store.record_certificate(cert, record("certificate_issued", "sre-1"))
        await store.close()
    newest = [line for line in logs if line["event"] == "audit_appended"][-1]
    return ChainHead(newest["seq"], newest["hash"])


def tamper(data_dir: Path, script: str) -> None:
    conn = sqlite3.connect(data_dir / "killswitch.db")
    triggers = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()
    drops = "".join(f"DROP TRIGGER {name};" for (name,) in triggers)
    conn.executescript(f"BEGIN; {drops} {script}; COMMIT;")
    conn.close()


async def read_whole_log(data_dir: Path) -> tuple[list[AuditEntry], ChainHead]:
    """Every entry, page by page; the head from the last page covers all of them."""
    store = await SqliteStore.open(data_dir)
    entries: list[AuditEntry] = []
    while True:
        page, head = await store.read_audit(entries[-1].seq if entries else 0, PAGE_SIZE)
        entries.extend(page)
        if len(page) < PAGE_SIZE:
            break
    await store.close()
    return entries, head


def audit_problem(data_dir: Path, anchor: ChainHead) -> ChainProblem | None:
    entries, head = asyncio.run(read_whole_log(data_dir))
    return verify_chain(entries, head) or verify_anchor(entries, anchor)


@pytest.fixture
def history(tmp_path: Path) -> ChainHead:
    anchor = asyncio.run(write_history(tmp_path))
    assert anchor.seq == ENTRIES_WRITTEN
    return anchor


def test_untouched_log_verifies_against_head_and_anchor(tmp_path: Path, history: ChainHead) -> None:
    entries, head = asyncio.run(read_whole_log(tmp_path))
    assert head == history
    assert [e.record.action for e in entries] == [
        "pause",
        "pause",
        "resume",
        "permission_denied",
        "token_created",
        "certificate_issued",
    ]
    assert audit_problem(tmp_path, history) is None


CUT_LOG_AND_HEAD = """
    DELETE FROM audit_log WHERE seq > 4;
    UPDATE audit_head SET seq = 4, hash = (SELECT hash FROM audit_log WHERE seq = 4)
"""


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        pytest.param(
            "UPDATE audit_log SET reason = 'routine maintenance' WHERE seq = 3",
            ChainProblem(3, "contents were changed after it was written"),
            id="edited-field",
        ),
        pytest.param(
            "DELETE FROM audit_log WHERE seq = 3",
            ChainProblem(3, "missing or reordered: found seq 4 in its place"),
            id="deleted-entry",
        ),
        pytest.param(
            """
            CREATE TEMP TABLE swapped AS SELECT * FROM audit_log WHERE seq IN (2, 3);
            UPDATE swapped SET seq = 5 - seq;
            DELETE FROM audit_log WHERE seq IN (2, 3);
            INSERT INTO audit_log SELECT * FROM swapped
            """,
            ChainProblem(2, "does not link to the entry before it"),
            id="swapped-pair-keeping-seqs",
        ),
        pytest.param(
            "DELETE FROM audit_log WHERE seq > 4",
            ChainProblem(5, "log truncated: the head says 6 entries"),
            id="truncated-tail",
        ),
        pytest.param(
            CUT_LOG_AND_HEAD,
            ChainProblem(5, "log truncated: the anchor says 6 entries"),
            id="truncated-tail-and-head",
        ),
    ],
)
def test_tampering_is_named_at_the_first_bad_entry(
    tmp_path: Path, history: ChainHead, script: str, expected: ChainProblem
) -> None:
    tamper(tmp_path, script)
    assert audit_problem(tmp_path, history) == expected


def test_a_consistent_cut_passes_the_chain_alone(tmp_path: Path, history: ChainHead) -> None:
    """Why the off-database anchor exists: without it, this cut is invisible."""
    tamper(tmp_path, CUT_LOG_AND_HEAD)
    entries, head = asyncio.run(read_whole_log(tmp_path))
    assert head.seq == 4
    assert verify_chain(entries, head) is None
