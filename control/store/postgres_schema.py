"""The PostgreSQL store's schema: each migration upgrades it by one version, in order.

The ``schema_version`` table records what was applied (``control.store.postgres``).
"""

from __future__ import annotations

from control.domain.audit import GENESIS_HASH
from control.store import enrolment
from control.store import outbox

# Each entry upgrades the schema by one version; never edit a released entry.
# Version 1 holds what SQLite reached in three: keep the two schemas' content alike.
MIGRATIONS: list[str] = [
    f"""
    CREATE TABLE epoch_counter (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        epoch BIGINT NOT NULL
    );
    INSERT INTO epoch_counter (id, epoch) VALUES (1, 0);
    -- The counters: a row whose column (the trigger's argument) never goes down.
    CREATE FUNCTION forward_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP <> 'UPDATE'
            OR (to_jsonb(NEW) ->> TG_ARGV[0])::bigint < (to_jsonb(OLD) ->> TG_ARGV[0])::bigint
        THEN
            RAISE EXCEPTION '% only moves forward', TG_TABLE_NAME;
        END IF;
        RETURN NEW;
    END $$;
    CREATE TRIGGER epoch_counter_forward_only BEFORE UPDATE OR DELETE ON epoch_counter
        FOR EACH ROW EXECUTE FUNCTION forward_only('epoch');
    CREATE TRIGGER epoch_counter_no_truncate BEFORE TRUNCATE ON epoch_counter
        FOR EACH STATEMENT EXECUTE FUNCTION forward_only('epoch');

    -- scope and labels are JSONB: validated label and id strings, worth querying.
    -- Documents with floats or agent-supplied strings are TEXT: written and read
    -- back byte for byte by control.store.codec.
    CREATE TABLE holds (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        scope JSONB NOT NULL,
        reason TEXT NOT NULL,
        ticket TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        created_epoch BIGINT NOT NULL,
        lifted_at DOUBLE PRECISION,
        lifted_by TEXT NOT NULL DEFAULT '',
        lifted_epoch BIGINT NOT NULL DEFAULT 0,
        keep_spool BOOLEAN NOT NULL DEFAULT FALSE,
        release TEXT
    );
    CREATE TABLE agents (
        agent_id TEXT PRIMARY KEY,
        labels JSONB NOT NULL,
        desired_mode TEXT NOT NULL,
        desired_hold_ids TEXT NOT NULL,
        desired_reason TEXT NOT NULL,
        desired_epoch BIGINT NOT NULL,
        desired_since DOUBLE PRECISION NOT NULL,
        desired_purge_spool BOOLEAN NOT NULL,
        expected_since DOUBLE PRECISION,
        first_seen DOUBLE PRECISION,
        last_seen DOUBLE PRECISION,
        connected_at DOUBLE PRECISION,
        disconnected_at DOUBLE PRECISION,
        directive_sent_at DOUBLE PRECISION,
        directive_sent_epoch BIGINT NOT NULL,
        acked_epoch BIGINT NOT NULL,
        acked_mode TEXT,
        acked_at DOUBLE PRECISION,
        nack_epoch BIGINT NOT NULL,
        nack_reason TEXT NOT NULL,
        nack_at DOUBLE PRECISION,
        channels TEXT NOT NULL,
        report TEXT NOT NULL,
        ack_report TEXT NOT NULL,
        purged_events BIGINT NOT NULL,
        quarantined_events BIGINT NOT NULL,
        verified_at DOUBLE PRECISION,
        lease_expires_at DOUBLE PRECISION,
        uploads_refused BIGINT NOT NULL,
        violation TEXT NOT NULL,
        violation_at DOUBLE PRECISION
    );

    CREATE TABLE audit_log (
        seq BIGINT PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
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
    CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'audit_log is append-only: entries cannot be %',
            CASE TG_OP WHEN 'UPDATE' THEN 'changed' WHEN 'DELETE' THEN 'deleted'
            ELSE 'truncated' END;
    END $$;
    CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
        FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
    CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
        FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
    CREATE TABLE audit_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq BIGINT NOT NULL,
        hash TEXT NOT NULL
    );
    INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '{GENESIS_HASH}');
    CREATE TRIGGER audit_head_forward_only BEFORE UPDATE OR DELETE ON audit_head
        FOR EACH ROW EXECUTE FUNCTION forward_only('seq');
    CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_head
        FOR EACH STATEMENT EXECUTE FUNCTION forward_only('seq');

    CREATE TABLE resume_requests (
        id TEXT PRIMARY KEY,
        hold_id TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        reason TEXT NOT NULL,
        ticket TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        for_runbook BOOLEAN NOT NULL,
        state TEXT NOT NULL,
        revision BIGINT NOT NULL,
        approvals TEXT NOT NULL,
        decided_by TEXT NOT NULL,
        decided_at DOUBLE PRECISION,
        decision_note TEXT NOT NULL,
        lifted_epoch BIGINT NOT NULL
    );
    CREATE TABLE enroll_tokens (
        id TEXT PRIMARY KEY,
        secret_sha256 TEXT NOT NULL,
        uses_left BIGINT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        created_by TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        subject TEXT NOT NULL,
        role TEXT NOT NULL,
        not_after DOUBLE PRECISION NOT NULL,
        issued_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION
    );
    CREATE INDEX certificates_by_subject ON certificates (subject);
    CREATE TABLE runbook_runs (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        run TEXT NOT NULL
    );
    """,
    # Version 2: what another replica needs to show an agent it does not serve.
    """
    ALTER TABLE agents
        ADD COLUMN connected BOOLEAN NOT NULL DEFAULT FALSE,
        ADD COLUMN acked_since_connect BOOLEAN NOT NULL DEFAULT FALSE,
        ADD COLUMN nacked_since_connect BOOLEAN NOT NULL DEFAULT FALSE,
        ADD COLUMN written_by TEXT NOT NULL DEFAULT '',
        ADD COLUMN written_at DOUBLE PRECISION,
        -- The writing transaction: readers ask for rows newer than a snapshot horizon.
        ADD COLUMN written_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
    CREATE INDEX agents_by_written_xid ON agents (written_xid);
    CREATE TABLE replicas (
        replica_id TEXT PRIMARY KEY,
        started_at DOUBLE PRECISION NOT NULL,
        beat_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE violation_acks (
        agent_id TEXT PRIMARY KEY,
        violation_at DOUBLE PRECISION NOT NULL
    );
    """,
    # Version 3: dashboard sessions any replica can check.
    """
    CREATE TABLE dashboard_sessions (
        key TEXT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        role TEXT NOT NULL,
        serial TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (key, kind)
    );
    """,
    # Violations are durable.
    # Version 4: evidence any replica appends, and the stop a later pause ack keeps.
    """
    ALTER TABLE agents ADD COLUMN stopped_at DOUBLE PRECISION;
    CREATE TABLE violation_evidence (
        id TEXT PRIMARY KEY,
        agent_id TEXT NOT NULL,
        flagged_at DOUBLE PRECISION NOT NULL,
        evidence TEXT NOT NULL,
        detected_by TEXT NOT NULL,
        epoch BIGINT NOT NULL
    );
    CREATE INDEX violation_evidence_by_agent ON violation_evidence (agent_id, flagged_at);
    CREATE FUNCTION violation_evidence_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'violation_evidence is append-only: entries cannot be %',
            CASE TG_OP WHEN 'UPDATE' THEN 'changed' WHEN 'DELETE' THEN 'deleted'
            ELSE 'truncated' END;
    END $$;
    CREATE TRIGGER violation_evidence_no_change BEFORE UPDATE OR DELETE ON violation_evidence
        FOR EACH ROW EXECUTE FUNCTION violation_evidence_append_only();
    CREATE TRIGGER violation_evidence_no_truncate BEFORE TRUNCATE ON violation_evidence
        FOR EACH STATEMENT EXECUTE FUNCTION violation_evidence_append_only();
    """,
    # History compaction.
    # Version 5: finished history is marked archived; hot reads walk a partial index of the rest.
    """
    ALTER TABLE holds ADD COLUMN archived_at DOUBLE PRECISION;
    ALTER TABLE resume_requests ADD COLUMN archived_at DOUBLE PRECISION;
    ALTER TABLE runbook_runs
        ADD COLUMN ended_at DOUBLE PRECISION,
        ADD COLUMN archived_at DOUBLE PRECISION;
    UPDATE runbook_runs SET ended_at = (run::jsonb ->> 'ended_at')::double precision;
    CREATE INDEX holds_hot ON holds (created_epoch, id) WHERE archived_at IS NULL;
    CREATE INDEX resume_requests_hot ON resume_requests (created_at, id)
        WHERE archived_at IS NULL;
    CREATE INDEX runbook_runs_hot ON runbook_runs (started_at, id) WHERE archived_at IS NULL;
    """,
    # Server-decided labels.
    # Version 6: what each agent reported of itself (NULL: never connected), kept apart
    # from the labels the server decides; and the labels a join token pins.
    """
    ALTER TABLE agents ADD COLUMN reported_labels TEXT;
    ALTER TABLE enroll_tokens ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
    """,
    # Decided labels are shared state.
    # Version 7: the labels operators decided, apart from the agents' rows (which only
    # the replica serving an agent writes), under a version every label change takes
    # from one counter row: its lock makes versions commit in order, so a replica that
    # reads what is newer than the last version it saw never skips one.
    """
    CREATE TABLE label_counter (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version BIGINT NOT NULL
    );
    INSERT INTO label_counter (id, version) VALUES (1, 0);
    CREATE TRIGGER label_counter_forward_only BEFORE UPDATE OR DELETE ON label_counter
        FOR EACH ROW EXECUTE FUNCTION forward_only('version');
    CREATE TRIGGER label_counter_no_truncate BEFORE TRUNCATE ON label_counter
        FOR EACH STATEMENT EXECUTE FUNCTION forward_only('version');
    CREATE TABLE agent_labels (
        agent_id TEXT PRIMARY KEY,
        labels JSONB NOT NULL,
        set_by TEXT NOT NULL,
        set_at DOUBLE PRECISION NOT NULL,
        version BIGINT NOT NULL
    );
    CREATE INDEX agent_labels_by_version ON agent_labels (version);
    """,
    # ---- issue 14 (ingest gateway): renumber at merge if another migration lands first.
    # Version 11: what the ingest gateway reported landing in its sink, per agent: events
    # dated after the agent's newest stop (0 expected), and the newest capture time.
    """
    ALTER TABLE agents ADD COLUMN events_accepted_after_pause BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN last_accepted_event_at DOUBLE PRECISION;
    """,
    # ---- issue 15 (drill requests): before the claim, whose tests re-run what follows it.
    # Version 12: a drill request has no hold; it approves one drill runbook's exact text.
    """
    ALTER TABLE resume_requests ADD COLUMN drill_runbook TEXT NOT NULL DEFAULT '';
    ALTER TABLE resume_requests ADD COLUMN drill_sha256 TEXT NOT NULL DEFAULT '';
    """,
    # ---- issue 15: one valid certificate per agent id (control.store.enrolment).
    enrolment.CLAIM_MIGRATION,
    # ---- issue 15: a laptop's opt-out is one hold (control.domain.holds.opt_out_hold_id);
    # the lifted ones of earlier cycles, each its own row, are archived now.
    """
    UPDATE holds SET archived_at = extract(epoch FROM now())
    WHERE kind = 'opt_out' AND lifted_at IS NOT NULL AND archived_at IS NULL;
    """,
    # ---- issue 16: webhook deliveries waiting, durable across restarts (control.store.outbox).
    outbox.POSTGRES_MIGRATION,
]
