"""The SQLite store's schema: each migration upgrades it by one version, in order.

``PRAGMA user_version`` is the number applied so far (``control.store.sqlite``).
"""

from __future__ import annotations

from control.domain.audit import GENESIS_HASH
from control.store import enrolment
from control.store import outbox

# Each entry upgrades the schema by one version; never edit a released entry.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE epoch_counter (id INTEGER PRIMARY KEY CHECK (id = 1), epoch INTEGER NOT NULL);
    INSERT INTO epoch_counter (id, epoch) VALUES (1, 0);
    CREATE TABLE holds (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        scope TEXT NOT NULL,
        reason TEXT NOT NULL,
        ticket TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at REAL NOT NULL,
        created_epoch INTEGER NOT NULL,
        lifted_at REAL,
        lifted_by TEXT NOT NULL DEFAULT '',
        lifted_epoch INTEGER NOT NULL DEFAULT 0,
        keep_spool INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE agents (
        agent_id TEXT PRIMARY KEY,
        labels TEXT NOT NULL,
        desired_mode TEXT NOT NULL,
        desired_hold_ids TEXT NOT NULL,
        desired_reason TEXT NOT NULL,
        desired_epoch INTEGER NOT NULL,
        desired_since REAL NOT NULL,
        desired_purge_spool INTEGER NOT NULL,
        expected_since REAL,
        first_seen REAL,
        last_seen REAL,
        connected_at REAL,
        disconnected_at REAL,
        directive_sent_at REAL,
        directive_sent_epoch INTEGER NOT NULL,
        acked_epoch INTEGER NOT NULL,
        acked_mode TEXT,
        acked_at REAL,
        nack_epoch INTEGER NOT NULL,
        nack_reason TEXT NOT NULL,
        nack_at REAL,
        channels TEXT NOT NULL,
        report TEXT NOT NULL,
        ack_report TEXT NOT NULL,
        purged_events INTEGER NOT NULL,
        quarantined_events INTEGER NOT NULL,
        verified_at REAL,
        lease_expires_at REAL,
        uploads_refused INTEGER NOT NULL,
        violation TEXT NOT NULL,
        violation_at REAL
    );
    """,
    f"""
    CREATE TABLE audit_log (
        seq INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        actor TEXT NOT NULL,
        role TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        reason TEXT NOT NULL,
        ticket TEXT NOT NULL,
        result TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: entries cannot be changed'); END;
    CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: entries cannot be deleted'); END;
    -- INSERT OR REPLACE deletes without firing delete triggers: refuse reused seqs.
    CREATE TRIGGER audit_log_no_overwrite BEFORE INSERT ON audit_log
    WHEN NEW.seq <= (SELECT max(seq) FROM audit_log)
    BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: seq already written'); END;
    CREATE TABLE audit_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL,
        hash TEXT NOT NULL
    );
    INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '{GENESIS_HASH}');
    CREATE TRIGGER audit_head_forward_only BEFORE UPDATE ON audit_head
    WHEN NEW.seq < OLD.seq
    BEGIN SELECT RAISE(ABORT, 'audit_head only moves forward'); END;
    CREATE TABLE resume_requests (
        id TEXT PRIMARY KEY,
        hold_id TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        reason TEXT NOT NULL,
        ticket TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        for_runbook INTEGER NOT NULL,
        state TEXT NOT NULL,
        revision INTEGER NOT NULL,
        approvals TEXT NOT NULL,
        decided_by TEXT NOT NULL,
        decided_at REAL,
        decision_note TEXT NOT NULL,
        lifted_epoch INTEGER NOT NULL
    );
    CREATE TABLE enroll_tokens (
        id TEXT PRIMARY KEY,
        secret_sha256 TEXT NOT NULL,
        uses_left INTEGER NOT NULL,
        expires_at REAL NOT NULL,
        created_by TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        subject TEXT NOT NULL,
        role TEXT NOT NULL,
        not_after REAL NOT NULL,
        issued_at REAL NOT NULL,
        revoked_at REAL
    );
    CREATE INDEX certificates_by_subject ON certificates (subject);
    """,
    """
    ALTER TABLE holds ADD COLUMN release TEXT;
    CREATE TABLE runbook_runs (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        started_at REAL NOT NULL,
        run TEXT NOT NULL
    );
    """,
    """
    ALTER TABLE agents ADD COLUMN connected INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN acked_since_connect INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN nacked_since_connect INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN written_by TEXT NOT NULL DEFAULT '';
    ALTER TABLE agents ADD COLUMN written_at REAL;
    CREATE TABLE violation_acks (
        agent_id TEXT PRIMARY KEY,
        violation_at REAL NOT NULL
    );
    """,
    """
    CREATE TABLE dashboard_sessions (
        key TEXT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        role TEXT NOT NULL,
        serial TEXT NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (key, kind)
    );
    """,
    # Store health: the beat is a durable write.
    """
    CREATE TABLE store_beat (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        replica_id TEXT NOT NULL,
        beat_at REAL NOT NULL
    );
    """,
    # Violations are durable.
    """
    ALTER TABLE agents ADD COLUMN stopped_at REAL;
    CREATE TABLE violation_evidence (
        id TEXT PRIMARY KEY,
        agent_id TEXT NOT NULL,
        flagged_at REAL NOT NULL,
        evidence TEXT NOT NULL,
        detected_by TEXT NOT NULL,
        epoch INTEGER NOT NULL
    );
    CREATE INDEX violation_evidence_by_agent ON violation_evidence (agent_id, flagged_at);
    CREATE TRIGGER violation_evidence_no_update BEFORE UPDATE ON violation_evidence
    BEGIN SELECT RAISE(ABORT, 'violation_evidence is append-only: entries cannot be changed'); END;
    CREATE TRIGGER violation_evidence_no_delete BEFORE DELETE ON violation_evidence
    BEGIN SELECT RAISE(ABORT, 'violation_evidence is append-only: entries cannot be deleted'); END;
    -- INSERT OR REPLACE deletes without firing delete triggers: refuse reused ids.
    CREATE TRIGGER violation_evidence_no_overwrite BEFORE INSERT ON violation_evidence
    WHEN EXISTS (SELECT 1 FROM violation_evidence WHERE id = NEW.id)
    BEGIN SELECT RAISE(ABORT, 'violation_evidence is append-only: id already written'); END;
    """,
    # History compaction.
    # Finished history is marked archived, and hot reads walk a partial index of the rest.
    """
    ALTER TABLE holds ADD COLUMN archived_at REAL;
    ALTER TABLE resume_requests ADD COLUMN archived_at REAL;
    ALTER TABLE runbook_runs ADD COLUMN ended_at REAL;
    ALTER TABLE runbook_runs ADD COLUMN archived_at REAL;
    UPDATE runbook_runs SET ended_at = json_extract(run, '$.ended_at');
    CREATE INDEX holds_hot ON holds (created_epoch) WHERE archived_at IS NULL;
    CREATE INDEX resume_requests_hot ON resume_requests (created_at, id)
        WHERE archived_at IS NULL;
    CREATE INDEX runbook_runs_hot ON runbook_runs (started_at, id) WHERE archived_at IS NULL;
    """,
    # Server-decided labels.
    # What each agent reported of itself (NULL: never connected), kept apart from the
    # labels the server decides; and the labels a join token pins on its agents.
    """
    ALTER TABLE agents ADD COLUMN reported_labels TEXT;
    ALTER TABLE enroll_tokens ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
    """,
    # Decided labels are shared state.
    # The labels operators decided, apart from the agents' rows (which only the replica
    # serving an agent writes), under a version every label change moves forward.
    """
    CREATE TABLE agent_labels (
        agent_id TEXT PRIMARY KEY,
        labels TEXT NOT NULL,
        set_by TEXT NOT NULL,
        set_at REAL NOT NULL,
        version INTEGER NOT NULL
    );
    CREATE INDEX agent_labels_by_version ON agent_labels (version);
    CREATE TABLE label_counter (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL
    );
    INSERT INTO label_counter (id, version) VALUES (1, 0);
    """,
    # ---- issue 14 (ingest gateway): renumber at merge if another migration lands first.
    # What the ingest gateway reported landing in its sink, per agent: events dated after
    # the agent's newest stop (0 expected), and the newest capture time accepted.
    """
    ALTER TABLE agents ADD COLUMN events_accepted_after_pause INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN last_accepted_event_at REAL;
    """,
    # ---- issue 15 (drill requests): before the claim, whose tests re-run what follows it.
    # A drill request has no hold: it approves starting one drill runbook's exact text.
    """
    ALTER TABLE resume_requests ADD COLUMN drill_runbook TEXT NOT NULL DEFAULT '';
    ALTER TABLE resume_requests ADD COLUMN drill_sha256 TEXT NOT NULL DEFAULT '';
    """,
    # ---- issue 15: one valid certificate per agent id (control.store.enrolment).
    enrolment.CLAIM_MIGRATION,
    # ---- issue 15: a laptop's opt-out is one hold (control.domain.holds.opt_out_hold_id);
    # the lifted ones of earlier cycles, each its own row, are archived now.
    """
    UPDATE holds SET archived_at = (julianday('now') - 2440587.5) * 86400.0
    WHERE kind = 'opt_out' AND lifted_at IS NOT NULL AND archived_at IS NULL;
    """,
    # ---- issue 16: webhook deliveries waiting, durable across restarts (control.store.outbox).
    outbox.SQLITE_MIGRATION,
]
