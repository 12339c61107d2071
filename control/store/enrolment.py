"""One valid certificate per agent id, fleet-wide: the SQL both stores run to enrol.

A certificate row's ``enrolment_claim`` holds the agent id it was issued to by
enrolment, under a unique index: two enrolments of one id cannot both commit, on one
server or on two replicas, whatever either read first. The claim outlives the
certificate's validity until the next enrolment of that id, which releases it inside
its own transaction when the certificate holding it is revoked or expired (so neither
blocks re-enrolment, as before), then checks that no valid certificate remains.
"""

from __future__ import annotations

from control.errors import Conflict
from control.store import codec

# Each store adds this column and index in its own migration (``MIGRATIONS``). On a
# database that already holds several unrevoked certificates of one agent (issued
# before the constraint existed), only the newest takes the claim; the others stay as
# they are, valid until revoked or expired, and still refuse a new enrolment.
CLAIM_MIGRATION = """
    ALTER TABLE certificates ADD COLUMN enrolment_claim TEXT;
    UPDATE certificates SET enrolment_claim = subject
    WHERE serial IN (
        SELECT newest.serial FROM certificates AS newest
        WHERE newest.role = 'agent' AND newest.revoked_at IS NULL
        AND NOT EXISTS (
            SELECT 1 FROM certificates AS newer
            WHERE newer.subject = newest.subject AND newer.role = 'agent'
            AND newer.revoked_at IS NULL
            AND (newer.issued_at, newer.serial) > (newest.issued_at, newest.serial)
        )
    );
    CREATE UNIQUE INDEX certificates_one_enrolment_claim ON certificates (enrolment_claim);
"""


def statements(placeholder: str) -> tuple[str, str, str]:
    """The release of a spent claim, the search for a valid certificate and the insert
    of a new claiming one, in a store's parameter style (``?`` or ``%s``)."""
    p = placeholder
    release = (
        f"UPDATE certificates SET enrolment_claim = NULL WHERE enrolment_claim = {p}"
        f" AND (revoked_at IS NOT NULL OR not_after <= {p})"
    )
    valid = (
        f"SELECT serial FROM certificates WHERE subject = {p} AND revoked_at IS NULL"
        f" AND not_after > {p} ORDER BY issued_at, serial LIMIT 1"
    )
    columns = (*codec.CERTIFICATE_COLUMNS, "enrolment_claim")
    insert = (
        f"INSERT INTO certificates ({', '.join(columns)})"
        f" VALUES ({', '.join([p] * len(columns))}) ON CONFLICT DO NOTHING RETURNING 1"
    )
    return release, valid, insert


def already_enrolled(agent_id: str, serial: str) -> Conflict:
    return Conflict(
        f"agent {agent_id} already has a valid certificate (serial {serial});"
        f" revoke it first: killswitch certs revoke {agent_id}"
    )
