"""The audit hash chain on its own: every kind of damage is named at the first bad seq."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from control.domain.audit import GENESIS_HASH
from control.domain.audit import MAX_FIELD_CHARS
from control.domain.audit import AuditEntry
from control.domain.audit import AuditRecord
from control.domain.audit import ChainHead
from control.domain.audit import ChainProblem
from control.domain.audit import chain
from control.domain.audit import entry_hash
from control.domain.audit import verify_anchor
from control.domain.audit import verify_chain


def build(count: int) -> list[AuditEntry]:
    entries: list[AuditEntry] = []
    for n in range(1, count + 1):
        record = AuditRecord(at=1000.0 + n, actor=f"user-{n}", role="sre", action=f"action-{n}")
        entries.append(chain(entries[-1] if entries else None, record))
    return entries


def head_of(entries: list[AuditEntry]) -> ChainHead:
    return ChainHead(entries[-1].seq, entries[-1].hash)


def test_a_good_chain_verifies() -> None:
    entries = build(5)
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(entries))
    assert verify_chain(entries, head_of(entries)) is None
    assert verify_chain(entries, None) is None


def test_chaining_from_a_stored_head_equals_chaining_from_the_entry() -> None:
    entries = build(3)
    record = AuditRecord(at=2000.0, actor="ic-1", role="sre", action="pause")
    assert chain(head_of(entries), record) == chain(entries[-1], record)
    assert chain(ChainHead(0, GENESIS_HASH), record) == chain(None, record)


def test_an_int_timestamp_hashes_like_the_float_storage_returns() -> None:
    as_int = AuditRecord(at=1000, actor="a", role="sre", action="pause")
    as_float = dataclasses.replace(as_int, at=1000.0)
    assert entry_hash(1, as_int, GENESIS_HASH) == entry_hash(1, as_float, GENESIS_HASH)


def test_chaining_clips_oversized_fields() -> None:
    record = AuditRecord(at=1.0, actor="a", role="sre", action="pause", reason="x" * 10_000)
    assert chain(None, record).record.reason == "x" * MAX_FIELD_CHARS


def test_edited_field_is_named_at_its_seq() -> None:
    entries = build(5)
    forged = dataclasses.replace(entries[2].record, actor="someone-else")
    entries[2] = dataclasses.replace(entries[2], record=forged)
    assert verify_chain(entries, head_of(entries)) == ChainProblem(
        3, "contents were changed after it was written"
    )


def test_edited_and_rehashed_entry_breaks_the_next_link() -> None:
    entries = build(5)
    forged = dataclasses.replace(entries[2].record, actor="someone-else")
    rehashed = entry_hash(3, forged, entries[2].prev_hash)
    entries[2] = dataclasses.replace(entries[2], record=forged, hash=rehashed)
    assert verify_chain(entries, None) == ChainProblem(4, "does not link to the entry before it")


def test_deleted_middle_entry_is_named() -> None:
    entries = build(5)
    head = head_of(entries)
    del entries[2]
    assert verify_chain(entries, head) == ChainProblem(
        3, "missing or reordered: found seq 4 in its place"
    )


def test_swapped_pair_with_their_seqs_is_named_at_the_first() -> None:
    entries = build(5)
    second, third = entries[1], entries[2]
    entries[1] = dataclasses.replace(third, seq=2)
    entries[2] = dataclasses.replace(second, seq=3)
    assert verify_chain(entries, head_of(entries)) == ChainProblem(
        2, "does not link to the entry before it"
    )


def test_swapped_pair_in_storage_order_is_out_of_order() -> None:
    entries = build(5)
    entries[1], entries[2] = entries[2], entries[1]
    assert verify_chain(entries, None) == ChainProblem(
        2, "missing or reordered: found seq 3 in its place"
    )


def test_truncated_tail_is_caught_by_the_head() -> None:
    entries = build(5)
    head = head_of(entries)
    assert verify_chain(entries[:3], head) == ChainProblem(
        4, "log truncated: the head says 5 entries"
    )


def test_entries_beyond_the_head_are_named() -> None:
    entries = build(5)
    assert verify_chain(entries, head_of(entries[:3])) == ChainProblem(
        4, "entries after the recorded head"
    )


def test_wrong_head_hash_is_named() -> None:
    entries = build(5)
    assert verify_chain(entries, ChainHead(5, entries[3].hash)) == ChainProblem(
        5, "does not match the recorded head hash"
    )


def test_empty_log() -> None:
    assert verify_chain([], ChainHead(0, GENESIS_HASH)) is None
    assert verify_chain([], ChainHead(2, "f" * 64)) == ChainProblem(
        1, "log truncated: the head says 2 entries"
    )


def test_problem_reads_as_one_line() -> None:
    assert str(ChainProblem(3, "does not link")) == "audit entry 3: does not link"


def test_anchor_catches_a_cut_made_together_with_the_head() -> None:
    entries = build(6)
    anchor = head_of(entries)
    cut = entries[:4]
    assert verify_chain(cut, head_of(cut)) is None, "the chain alone cannot see this cut"
    assert verify_anchor(cut, anchor) == ChainProblem(5, "log truncated: the anchor says 6 entries")


@pytest.mark.parametrize("anchor_at", [0, 3, 6])
def test_anchor_within_an_intact_log_verifies(anchor_at: int) -> None:
    entries = build(6)
    anchor = head_of(entries[:anchor_at]) if anchor_at else ChainHead(0, GENESIS_HASH)
    assert verify_anchor(entries, anchor) is None


def test_anchor_catches_a_rewritten_history() -> None:
    entries = build(6)
    anchor = head_of(entries[:4])
    rewritten = build(3)
    record = AuditRecord(at=1.0, actor="mallory", role="sre", action="nothing-happened")
    rewritten.append(chain(rewritten[-1], record))
    assert verify_chain(rewritten, head_of(rewritten)) is None
    assert verify_anchor(rewritten, anchor) == ChainProblem(
        4, "does not match the hash logged when it was written"
    )
