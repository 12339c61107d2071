"""What every store shares: the row and JSON shapes of stored objects, the checks a
write makes inside its transaction, and the log line that anchors each audit entry.

A row is a tuple in the order of its table's column list here; a store reads rows
back by column name (``sqlite3.Row`` and psycopg's ``dict_row`` both allow that).
JSON documents are text written by this module, so every store returns exactly
what it was given, floats included.

A run is stored as one document: it is read and written whole, by one runner, and
its shape grows with the runbook features rather than with queries.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Protocol
from typing import overload

import structlog

from control.domain import AgentStatus
from control.domain import CaptureReport
from control.domain import Desired
from control.domain import Hold
from control.domain import HoldKind
from control.domain import Mode
from control.domain import Scope
from control.domain import ScopeKind
from control.domain.approvals import Approval
from control.domain.approvals import ResumeRequest
from control.domain.approvals import ResumeState
from control.domain.audit import AuditEntry
from control.domain.audit import AuditRecord
from control.domain.identity import CertificateRecord
from control.domain.identity import EnrollToken
from control.domain.identity import Principal
from control.domain.identity import Role
from control.domain.release import Release
from control.domain.rollout import GateResult
from control.domain.rollout import Run
from control.domain.rollout import RunState
from control.domain.rollout import WaveProgress
from control.domain.rollout import WaveState
from control.store import DashboardSession
from control.store import DecidedLabels
from control.store import StoredAgent
from control.store import ViolationEvidence

log = structlog.get_logger("killswitch.store")


class Row(Protocol):
    """A fetched row, read by column name."""

    def __getitem__(self, key: str, /) -> Any: ...


_DESIRED_COLUMNS = (
    "desired_mode",
    "desired_hold_ids",
    "desired_reason",
    "desired_epoch",
    "desired_since",
    "desired_purge_spool",
)
# ``json.dumps`` with options builds an encoder per call; the rows' hot path reuses these.
_encode = json.JSONEncoder().encode
_encode_sorted = json.JSONEncoder(sort_keys=True).encode

# Named as the AgentStatus fields they store.
_STATUS_COLUMNS = (
    "expected_since",
    "first_seen",
    "last_seen",
    "connected_at",
    "disconnected_at",
    "directive_sent_at",
    "directive_sent_epoch",
    "acked_epoch",
    "acked_mode",
    "acked_at",
    "nack_epoch",
    "nack_reason",
    "nack_at",
    "channels",
    "report",
    "ack_report",
    "stopped_at",
    "purged_events",
    "quarantined_events",
    "verified_at",
    "lease_expires_at",
    "uploads_refused",
    "events_accepted_after_pause",
    "last_accepted_event_at",
    "violation",
    "violation_at",
    # The stream as its replica saw it when writing: what other replicas show.
    "connected",
    "acked_since_connect",
    "nacked_since_connect",
    "reported_labels",
)
_STREAM_FLAGS = ("connected", "acked_since_connect", "nacked_since_connect")
AGENT_COLUMNS = (
    "agent_id",
    "labels",
    *_DESIRED_COLUMNS,
    *_STATUS_COLUMNS,
    "written_by",
    "written_at",
)
VIOLATION_ACK_COLUMNS = ("agent_id", "violation_at")
DASHBOARD_SESSION_COLUMNS = ("key", "kind", "name", "role", "serial", "expires_at")
SELECT_VIOLATION_ACKS = "SELECT agent_id, violation_at FROM violation_acks"
EVIDENCE_COLUMNS = tuple(f.name for f in dataclasses.fields(ViolationEvidence))
SELECT_UNACKNOWLEDGED_EVIDENCE = (
    f"SELECT {', '.join(f'e.{c}' for c in EVIDENCE_COLUMNS)} FROM violation_evidence e"
    " LEFT JOIN violation_acks a ON a.agent_id = e.agent_id"
    " WHERE a.violation_at IS NULL OR e.flagged_at > a.violation_at"
    " ORDER BY e.flagged_at, e.id"
)
SELECT_REVOKED = "SELECT serial, subject FROM certificates WHERE revoked_at IS NOT NULL"
HOLD_COLUMNS = (
    "id",
    "kind",
    "scope",
    "reason",
    "ticket",
    "created_by",
    "created_at",
    "created_epoch",
    "lifted_at",
    "lifted_by",
    "lifted_epoch",
    "keep_spool",
    "release",
)
AUDIT_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(AuditRecord))
AUDIT_COLUMNS = ("seq", *AUDIT_RECORD_FIELDS, "prev_hash", "hash")
RESUME_COLUMNS = (
    "id",
    "hold_id",
    "requested_by",
    "reason",
    "ticket",
    "created_at",
    "expires_at",
    "for_runbook",
    "state",
    "revision",
    "approvals",
    "decided_by",
    "decided_at",
    "decision_note",
    "lifted_epoch",
    "drill_runbook",
    "drill_sha256",
)
TOKEN_COLUMNS = (
    "id",
    "secret_sha256",
    "uses_left",
    "expires_at",
    "created_by",
    "created_at",
    "labels",
)
DECIDED_LABEL_COLUMNS = ("agent_id", "labels", "set_by", "set_at", "version")
CERTIFICATE_COLUMNS = ("serial", "subject", "role", "not_after", "issued_at", "revoked_at")
RUN_COLUMNS = ("id", "state", "started_at", "run", "ended_at")


def select_sql(table: str, columns: Sequence[str]) -> str:
    return f"SELECT {', '.join(columns)} FROM {table}"


# Agent rows as every store reads them: an operator's decided labels (``agent_labels``)
# over whatever labels the row was written with.
SELECT_AGENTS = (
    "SELECT "
    + ", ".join(
        "COALESCE(decided.labels, agents.labels) AS labels" if c == "labels" else f"agents.{c}"
        for c in AGENT_COLUMNS
    )
    + " FROM agents LEFT JOIN agent_labels decided USING (agent_id)"
)
SELECT_DECIDED_LABELS = select_sql("agent_labels", DECIDED_LABEL_COLUMNS)


def upsert_decided_labels(placeholder: str) -> str:
    """Insert or replace an agent's decided labels, unless they are the stored ones: an
    import that changes nothing moves no version, so no replica re-reads it."""
    columns = ", ".join(DECIDED_LABEL_COLUMNS)
    values = ", ".join([placeholder] * len(DECIDED_LABEL_COLUMNS))
    updates = ", ".join(f"{c} = excluded.{c}" for c in DECIDED_LABEL_COLUMNS[1:])
    return (
        f"INSERT INTO agent_labels ({columns}) VALUES ({values})"
        f" ON CONFLICT (agent_id) DO UPDATE SET {updates}"
        " WHERE agent_labels.labels <> excluded.labels"
    )


def fields_of(obj: object, columns: Sequence[str], **encoded: Any) -> tuple[Any, ...]:
    """A row of ``obj``'s fields named like ``columns``, as they are but for ``encoded``."""
    return tuple(encoded[c] if c in encoded else getattr(obj, c) for c in columns)


def fields_from(row: Row, columns: Sequence[str], **decoded: Any) -> dict[str, Any]:
    """The fields named like ``columns`` to rebuild an object: as stored but for ``decoded``."""
    return {c: decoded[c] if c in decoded else row[c] for c in columns}


def scope_to_json(scope: Scope) -> str:
    if scope.kind is ScopeKind.SELECTOR:
        return json.dumps({"selector": dict(sorted(scope.match_labels.items()))})
    if scope.kind is ScopeKind.AGENTS:
        return json.dumps({"agents": sorted(scope.agent_ids)})
    return json.dumps({"all": True})


def scope_from_json(text: str) -> Scope:
    data = json.loads(text)
    if "selector" in data:
        return Scope.selector(data["selector"])
    if "agents" in data:
        return Scope.agents(data["agents"])
    return Scope.fleet()


@overload
def labels_to_json(labels: Mapping[str, str]) -> str: ...
@overload
def labels_to_json(labels: None) -> None: ...
def labels_to_json(labels: Mapping[str, str] | None) -> str | None:
    return None if labels is None else _encode_sorted(dict(labels))


def labels_from_json(text: str | None) -> dict[str, str] | None:
    # Sorted as written: a store may hand JSON objects back in an order of its own.
    return None if text is None else dict(sorted(json.loads(text).items()))


def report_to_json(report: CaptureReport) -> str:
    return _encode([report.events_total, report.last_event_at, report.spool_events])


def report_from_json(text: str) -> CaptureReport:
    events_total, last_event_at, spool_events = json.loads(text)
    return CaptureReport(events_total, last_event_at, spool_events)


def release_to_json(release: Release | None) -> str | None:
    if release is None:
        return None
    return json.dumps(
        {
            "seed": release.seed,
            "share": release.share,
            "selectors": [dict(selector) for selector in release.selectors],
            "cutoff": release.cutoff,
        }
    )


def release_from_json(text: str | None) -> Release | None:
    if text is None:
        return None
    data = json.loads(text)
    selectors = tuple(tuple(sorted(s.items())) for s in data["selectors"])
    # A release stored before cutoffs existed releases its selectors (and 100%) only:
    # its share laptops stay paused until the next wave cuts anew (fail closed).
    return Release(data["seed"], data["share"], selectors, data.get("cutoff", ""))


def _wave_to_dict(wave: WaveProgress) -> dict[str, Any]:
    return {
        "state": wave.state.value,
        "started_at": wave.started_at,
        "agents": wave.agents,
        "capturing": wave.capturing,
        "converged_at": wave.converged_at,
        "passed_at": wave.passed_at,
        "cutoff": wave.cutoff,
        "gates": [[g.name, g.passed, g.observed, g.limit] for g in wave.gates],
    }


def _wave_from_dict(data: dict[str, Any]) -> WaveProgress:
    return WaveProgress(
        state=WaveState(data["state"]),
        started_at=data["started_at"],
        agents=data["agents"],
        capturing=data["capturing"],
        converged_at=data["converged_at"],
        passed_at=data["passed_at"],
        cutoff=data.get("cutoff", ""),
        gates=tuple(GateResult(*g) for g in data["gates"]),
    )


_RUN_SCALARS = (
    "id",
    "runbook",
    "file_name",
    "source",
    "started_by",
    "started_at",
    "hold_id",
    "lifted_hold_id",
    "approval_id",
    "started_epoch",
    "current_wave",
    "pause_started_at",
    "pause_verified_at",
    "halt_reason",
    "ended_at",
    "updated_at",
)


def run_to_json(run: Run) -> str:
    data: dict[str, Any] = {name: getattr(run, name) for name in _RUN_SCALARS}
    data["state"] = run.state.value
    data["waves"] = [_wave_to_dict(w) for w in run.waves]
    data["version"] = run.version
    return json.dumps(data)


def run_from_json(text: str) -> Run:
    data = json.loads(text)
    return Run(
        state=RunState(data["state"]),
        waves=tuple(_wave_from_dict(w) for w in data["waves"]),
        # Runs stored before versions existed are version 0: their next step is 1.
        version=data.get("version", 0),
        **{name: data[name] for name in _RUN_SCALARS},
    )


def run_to_row(run: Run) -> tuple[Any, ...]:
    return (run.id, run.state.value, run.started_at, run_to_json(run), run.ended_at)


def hold_to_row(hold: Hold) -> tuple[Any, ...]:
    return fields_of(
        hold,
        HOLD_COLUMNS,
        kind=hold.kind.value,
        scope=scope_to_json(hold.scope),
        release=release_to_json(hold.release),
    )


def hold_from_row(row: Row) -> Hold:
    return Hold(
        **fields_from(
            row,
            HOLD_COLUMNS,
            kind=HoldKind(row["kind"]),
            scope=scope_from_json(row["scope"]),
            keep_spool=bool(row["keep_spool"]),
            release=release_from_json(row["release"]),
        )
    )


# Every status column read in one C call, then the encoded ones put in place: the
# writer encodes every changed agent a few times a second (20,000 rows in a
# 10,000-agent pause), where the generic ``fields_of`` took half as long again.
_STATUS_VALUES = operator.attrgetter(*_STATUS_COLUMNS)
_STATUS_ENCODERS: tuple[tuple[int, Callable[[Any], Any]], ...] = tuple(
    (_STATUS_COLUMNS.index(name), encode)
    for name, encode in (
        ("acked_mode", lambda mode: mode.value if mode else None),
        ("channels", _encode_sorted),
        ("report", report_to_json),
        ("ack_report", report_to_json),
        ("reported_labels", labels_to_json),
    )
)


def agent_to_row(agent: StoredAgent) -> tuple[Any, ...]:
    d, s = agent.desired, agent.status
    status = list(_STATUS_VALUES(s))
    for index, encode in _STATUS_ENCODERS:
        status[index] = encode(status[index])
    hold_ids = _encode(list(d.hold_ids))
    desired = (d.mode.value, hold_ids, d.reason, d.epoch, d.since, d.purge_spool)
    labels = labels_to_json(agent.labels)
    return (agent.agent_id, labels, *desired, *status, agent.written_by, agent.written_at)


def agent_from_row(row: Row) -> StoredAgent:
    desired = Desired(
        mode=Mode(row["desired_mode"]),
        hold_ids=tuple(json.loads(row["desired_hold_ids"])),
        reason=row["desired_reason"],
        epoch=row["desired_epoch"],
        since=row["desired_since"],
        purge_spool=bool(row["desired_purge_spool"]),
    )
    status = AgentStatus(
        **fields_from(
            row,
            _STATUS_COLUMNS,
            acked_mode=Mode(row["acked_mode"]) if row["acked_mode"] else None,
            channels=json.loads(row["channels"]),
            report=report_from_json(row["report"]),
            ack_report=report_from_json(row["ack_report"]),
            reported_labels=labels_from_json(row["reported_labels"]),
            **{flag: bool(row[flag]) for flag in _STREAM_FLAGS},
        )
    )
    return StoredAgent(
        row["agent_id"],
        labels_from_json(row["labels"]) or {},
        desired,
        status,
        row["written_by"],
        row["written_at"],
    )


def evidence_to_row(evidence: ViolationEvidence) -> tuple[Any, ...]:
    return fields_of(evidence, EVIDENCE_COLUMNS)


def evidence_from_row(row: Row) -> ViolationEvidence:
    return ViolationEvidence(**fields_from(row, EVIDENCE_COLUMNS))


def decided_labels_to_row(decided: DecidedLabels, version: int) -> tuple[Any, ...]:
    return fields_of(
        decided, DECIDED_LABEL_COLUMNS, labels=labels_to_json(decided.labels), version=version
    )


def decided_labels_from_row(row: Row) -> DecidedLabels:
    return DecidedLabels(
        **fields_from(row, DECIDED_LABEL_COLUMNS, labels=labels_from_json(row["labels"]) or {})
    )


def audit_to_row(entry: AuditEntry) -> tuple[Any, ...]:
    record = fields_of(entry.record, AUDIT_RECORD_FIELDS)
    return (entry.seq, *record, entry.prev_hash, entry.hash)


def audit_from_row(row: Row) -> AuditEntry:
    record = AuditRecord(**fields_from(row, AUDIT_RECORD_FIELDS))
    return AuditEntry(row["seq"], record, row["prev_hash"], row["hash"])


def resume_to_row(request: ResumeRequest) -> tuple[Any, ...]:
    return fields_of(
        request,
        RESUME_COLUMNS,
        state=request.state.value,
        approvals=json.dumps([dataclasses.asdict(a) for a in request.approvals]),
    )


def resume_from_row(row: Row) -> ResumeRequest:
    return ResumeRequest(
        **fields_from(
            row,
            RESUME_COLUMNS,
            for_runbook=bool(row["for_runbook"]),
            state=ResumeState(row["state"]),
            approvals=tuple(Approval(**a) for a in json.loads(row["approvals"])),
        )
    )


def token_to_row(token: EnrollToken) -> tuple[Any, ...]:
    return fields_of(token, TOKEN_COLUMNS, labels=labels_to_json(token.labels))


def token_from_row(row: Row) -> EnrollToken:
    return EnrollToken(
        **fields_from(row, TOKEN_COLUMNS, labels=labels_from_json(row["labels"]) or {})
    )


def certificate_from_row(row: Row) -> CertificateRecord:
    return CertificateRecord(**fields_from(row, CERTIFICATE_COLUMNS, role=Role(row["role"])))


# The checks a write makes inside its transaction, on rows it has just read.


def reactivating(insert_hold: str) -> str:
    """``insert_hold`` (a ``hold_to_row``) made to overwrite a lifted hold of the same id,
    archived or not, and to return one row unless that hold is still active."""
    updates = ", ".join(f"{c} = excluded.{c}" for c in HOLD_COLUMNS[1:])
    return (
        f"{insert_hold} ON CONFLICT (id) DO UPDATE SET {updates}, archived_at = NULL"
        " WHERE holds.lifted_at IS NOT NULL RETURNING 1"
    )


def dashboard_session_to_row(session: DashboardSession) -> tuple[Any, ...]:
    p = session.principal
    return (session.key, session.kind, p.name, p.role.value, p.serial, session.expires_at)


def dashboard_session_from_row(row: Row) -> DashboardSession:
    principal = Principal(row["name"], Role(row["role"]), serial=row["serial"])
    return DashboardSession(row["key"], row["kind"], principal, row["expires_at"])
