"""Who is asking: roles, principals, certificates and enrolment tokens.

A principal's name and role always come from its mTLS certificate (subject CN
and OU); the transport adapter reads them, nothing here trusts a message field.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from enum import StrEnum
from types import MappingProxyType

from control.domain.scope import validate_labels
from control.errors import InvalidInput
from control.errors import shown

TOKEN_PREFIX = "kst"
MAX_TOKEN_USES = 100_000
MAX_TOKEN_TTL_SECONDS = 30 * 24 * 3600.0


class Role(StrEnum):
    """The roles of BRIEF §4; a certificate carries exactly one (its subject OU)."""

    INCIDENT_COMMANDER = "incident-commander"
    APPROVER = "approver"
    SRE = "sre"
    AUTOMATION = "automation"
    AGENT = "agent"
    EMPLOYEE = "employee"
    # The ingest gateway (`killswitch ingest`): asks whether agents' batches may land.
    INGEST = "ingest"
    # Issues and revokes identities and join tokens; can neither pause nor approve.
    ADMIN = "admin"


def parse_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        known = ", ".join(r.value for r in Role)
        raise InvalidInput(f"unknown role {shown(text)}; known roles: {known}") from None


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``name`` is the person, laptop or robot behind it.

    Two certificates with the same subject name are the same person, whatever
    their roles: that is what stops someone approving their own request.
    """

    name: str
    role: Role
    # Certificate serial (hex); empty for an insecure, loopback-only development server.
    serial: str = ""

    @property
    def authenticated(self) -> bool:
        return bool(self.serial)

    def describe(self) -> str:
        return f"{self.name} ({self.role.value})"


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    """A certificate the CA issued; revocation is by serial."""

    serial: str
    subject: str
    role: Role
    not_after: float
    issued_at: float
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True, slots=True)
class EnrollToken:
    """A join token as stored: only a hash of its secret is kept."""

    id: str
    secret_sha256: str
    uses_left: int
    expires_at: float
    created_by: str
    created_at: float
    # Pinned on every agent it enrols: the server's labels, whatever the agent reports.
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: EnrollToken
    # The full token, shown once to the operator who created it.
    text: str


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue_enroll_token(
    *,
    uses: int,
    ttl: float,
    created_by: str,
    now: float,
    labels: Mapping[str, str] = MappingProxyType({}),
) -> IssuedToken:
    if not 1 <= uses <= MAX_TOKEN_USES:
        raise InvalidInput(f"--uses must be between 1 and {MAX_TOKEN_USES}, got {uses}")
    if not 0 < ttl <= MAX_TOKEN_TTL_SECONDS:
        raise InvalidInput(
            f"--ttl must be more than 0 and at most {MAX_TOKEN_TTL_SECONDS:.0f} seconds,"
            f" got {ttl:g}"
        )
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(24)
    stored = EnrollToken(
        token_id, hash_secret(secret), uses, now + ttl, created_by, now, validate_labels(labels)
    )
    return IssuedToken(stored, f"{TOKEN_PREFIX}_{token_id}.{secret}")


def split_enroll_token(text: str) -> tuple[str, str]:
    """``kst_<id>.<secret>`` -> (id, secret), with one message for every malformed shape."""
    head, dot, secret = text.strip().partition(".")
    prefix, underscore, token_id = head.partition("_")
    if not (dot and underscore and prefix == TOKEN_PREFIX and token_id and secret):
        raise InvalidInput("malformed enrolment token: expected kst_<id>.<secret>")
    if len(text) > 200:
        raise InvalidInput("malformed enrolment token: too long")
    return token_id, secret


def check_enroll_token(token: EnrollToken | None, secret: str, now: float) -> str:
    """Why this token cannot enrol an agent, or '' when it can."""
    if token is None or not hmac.compare_digest(token.secret_sha256, hash_secret(secret)):
        return "unknown enrolment token"
    if now >= token.expires_at:
        return "enrolment token expired"
    if token.uses_left <= 0:
        return "enrolment token has no uses left"
    return ""
