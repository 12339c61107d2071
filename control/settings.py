"""``ServerSettings``: everything one server process is told, with every default once.

``killswitch serve`` builds one from its flags (``control.cli.serve.settings_from_args``,
the only place flags become settings) and its flags default to the fields here
(``DEFAULTS``); the composition root (``control.server``) takes nothing else. Defaults
owned by the code that gives them a meaning (the domain's protocol timings, the enrolment
gate's bucket, the runbook tick) are imported from there, not repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from control.audit_checkpoints import DEFAULT_INTERVAL as DEFAULT_CHECKPOINT_INTERVAL
from control.domain.history import DEFAULT_HISTORY_RETENTION_SECONDS
from control.domain.readiness import DEFAULT_MAX_CLOCK_SKEW_SECONDS
from control.domain.readiness import DEFAULT_OFFLINE_DAYS
from control.domain.rollout import DEFAULT_TICK_SECONDS
from control.domain.timings import DEFAULT_ACK_DEADLINE_SECONDS
from control.domain.timings import DEFAULT_HEARTBEAT_SECONDS
from control.domain.timings import DEFAULT_LEASE_TTL_SECONDS
from control.freshness import DEFAULT_RESYNC_SECONDS
from control.rpc.authz import DEFAULT_MAX_CALLS_PER_IDENTITY
from control.rpc.enrolment_gate import ENROL_BURST
from control.rpc.enrolment_gate import ENROL_PER_SECOND
from control.webhooks.config import WebhookSpec

if TYPE_CHECKING:
    # The dashboard's SSO (aiohttp, authlib): every CLI command imports these settings.
    from control.web.oidc import OidcSettings

# Where the server listens by default, and so where clients look for it (``--server``).
DEFAULT_GRPC_ADDRESS = "127.0.0.1:50051"
DEFAULT_HTTP_ADDRESS = "127.0.0.1:8080"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    data_dir: Path
    grpc_address: str = DEFAULT_GRPC_ADDRESS
    http_address: str = DEFAULT_HTTP_ADDRESS
    # Empty: the gRPC port + 1. Not served with --insecure (there is no CA).
    enroll_address: str = ""
    ack_deadline: float = DEFAULT_ACK_DEADLINE_SECONDS
    heartbeat_interval: float = DEFAULT_HEARTBEAT_SECONDS
    lease_ttl: float = DEFAULT_LEASE_TTL_SECONDS
    insecure: bool = False
    # Empty: SQLite in data_dir. A postgresql:// URL: PostgreSQL (several replicas).
    database: str = ""
    # Replicas re-read shared state this often even without a notification.
    resync_interval: float = DEFAULT_RESYNC_SECONDS
    max_calls_per_identity: int = DEFAULT_MAX_CALLS_PER_IDENTITY
    # The Prometheus servers runbook gates may query: (name a runbook uses, URL).
    prometheus: tuple[tuple[str, str], ...] = ()
    runbook_tick: float = DEFAULT_TICK_SECONDS
    # Lifted holds, decided requests and ended runs older than this are archived.
    history_retention: float = DEFAULT_HISTORY_RETENTION_SECONDS
    # The dashboard as browsers reach it (a TLS proxy); empty: http://HTTP-ADDRESS.
    public_url: str = ""
    # Empty: /metrics on the HTTP address. Else /metrics only here.
    metrics_address: str = ""
    # Signed audit checkpoints; empty: DATA/audit-checkpoints. Not with --insecure.
    audit_checkpoints: str = ""
    audit_checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL
    audit_syslog: bool = False
    # Readiness policy (besides the lease TTL above): see control.domain.readiness.
    min_agent_version: str = ""
    readiness_offline_days: float = DEFAULT_OFFLINE_DAYS
    max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW_SECONDS
    # Sign-in with the company's SSO (OpenID Connect); None: login links only.
    oidc: OidcSettings | None = None
    # Outbound webhooks (``control.webhooks``) and the secret file they share.
    webhooks: tuple[WebhookSpec, ...] = ()
    webhook_secret_file: str = ""
    # The enrolment port's token bucket per source address (control/rpc/enrolment_gate.py).
    enrol_rate: float = ENROL_PER_SECOND
    enrol_burst: int = ENROL_BURST


# Every field at its default, for the flags to default to (its data dir means nothing).
DEFAULTS = ServerSettings(data_dir=Path())
