"""The tamper-evident audit log: a SHA-256 hash chain over every recorded action.

Each entry's hash covers its own fields and the previous entry's hash, so an
edited, deleted or reordered entry breaks the chain from that point on. A cut
tail leaves a valid chain, so the store also keeps the head (the newest seq and
hash), and two anchors are kept off the database: the server logs every entry's
hash, and writes signed checkpoints (``control.audit_checkpoints``) that
``verify_checkpoints`` holds the chain to.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import fields
from dataclasses import replace

GENESIS_HASH = "0" * 64
RESULT_OK = "ok"
MAX_FIELD_CHARS = 2000


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One action, allowed or denied, before it is placed in the chain."""

    at: float
    actor: str
    role: str
    action: str
    target: str = ""
    reason: str = ""
    ticket: str = ""
    result: str = RESULT_OK
    detail: str = ""

    def clipped(self) -> AuditRecord:
        """Callers pass user input through here: a flood of huge values must not bloat the log."""
        texts = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "at"}
        return replace(self, **{name: text[:MAX_FIELD_CHARS] for name, text in texts.items()})


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    record: AuditRecord
    prev_hash: str
    hash: str


def entry_hash(seq: int, record: AuditRecord, prev_hash: str) -> str:
    """Canonical JSON, so the hash never depends on dict order or float formatting quirks.

    ``at`` is hashed as a float: an int timestamp comes back from storage as one.
    """
    payload = json.dumps(
        {"seq": seq, "prev": prev_hash, **asdict(record), "at": float(record.at)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def chain(previous: AuditEntry | ChainHead | None, record: AuditRecord) -> AuditEntry:
    """``previous`` may be the stored head: linking needs only its seq and hash."""
    seq = 1 if previous is None else previous.seq + 1
    prev_hash = GENESIS_HASH if previous is None else previous.hash
    clipped = record.clipped()
    return AuditEntry(seq, clipped, prev_hash, entry_hash(seq, clipped, prev_hash))


@dataclass(frozen=True, slots=True)
class ChainProblem:
    """The first entry that does not check out, and why."""

    seq: int
    problem: str

    def __str__(self) -> str:
        return f"audit entry {self.seq}: {self.problem}"


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The newest entry the writer committed, kept apart from the log: a cut tail leaves
    a valid chain, but not one that ends at the head."""

    seq: int
    hash: str


def verify_chain(entries: Iterable[AuditEntry], head: ChainHead | None) -> ChainProblem | None:
    """Walk the chain in order; ``head`` is the newest entry the writer committed."""
    previous_hash, expected_seq = GENESIS_HASH, 1
    for entry in entries:
        if entry.seq != expected_seq:
            what = "missing or reordered" if entry.seq > expected_seq else "out of order"
            return ChainProblem(expected_seq, f"{what}: found seq {entry.seq} in its place")
        if entry.prev_hash != previous_hash:
            return ChainProblem(entry.seq, "does not link to the entry before it")
        if entry_hash(entry.seq, entry.record, entry.prev_hash) != entry.hash:
            return ChainProblem(entry.seq, "contents were changed after it was written")
        previous_hash, expected_seq = entry.hash, expected_seq + 1
    last_seq = expected_seq - 1
    if head is not None:
        if head.seq > last_seq:
            return ChainProblem(last_seq + 1, f"log truncated: the head says {head.seq} entries")
        if head.seq < last_seq:
            return ChainProblem(head.seq + 1, "entries after the recorded head")
        if head.seq and head.hash != previous_hash:
            return ChainProblem(head.seq, "does not match the recorded head hash")
    return None


def verify_anchor(entries: Iterable[AuditEntry], anchor: ChainHead) -> ChainProblem | None:
    """Check a head kept off the database, e.g. from the server's ``audit_appended`` log.

    A log cut back together with its head is still a valid chain; only a copy
    kept elsewhere shows the cut. Run it on entries that passed ``verify_chain``.
    """
    last_seq = 0
    for entry in entries:
        if entry.seq == anchor.seq:
            if entry.hash != anchor.hash:
                return ChainProblem(entry.seq, "does not match the hash logged when it was written")
            return None
        last_seq = entry.seq
    if anchor.seq > last_seq:
        return ChainProblem(last_seq + 1, f"log truncated: the anchor says {anchor.seq} entries")
    return None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A head the server signed and wrote outside the database; ``name`` says where."""

    name: str
    seq: int
    hash: str
    at: float


def verify_checkpoints(
    entries: Iterable[AuditEntry], checkpoints: Iterable[Checkpoint]
) -> ChainProblem | None:
    """Hold the chain to every checkpoint, lowest seq first: an entry a checkpoint covers
    must still exist (else the tail was cut) with the hash it had (else it was rewritten).
    Run it on entries that passed ``verify_chain``; checkpoints whose signature checked out.
    """
    hashes = {entry.seq: entry.hash for entry in entries}
    last_seq = max(hashes, default=0)
    for checkpoint in sorted(checkpoints, key=lambda c: c.seq):
        if checkpoint.seq > last_seq:
            return ChainProblem(
                last_seq + 1,
                f"log truncated: checkpoint {checkpoint.name} says {checkpoint.seq} entries",
            )
        if hashes.get(checkpoint.seq) != checkpoint.hash:
            return ChainProblem(checkpoint.seq, f"does not match checkpoint {checkpoint.name}")
    return None
