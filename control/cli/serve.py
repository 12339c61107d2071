"""``killswitch serve``: run the control server, with every option that shapes it.

The options for what faces outside (the dashboard's public URL and SSO sign-in,
/metrics' own address, signed audit checkpoints, webhooks), the enrolment port's
limit and the readiness policy are grouped by what they set.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from control.cli.options import add_database_option
from control.cli.options import parse_argument
from control.cli.options import positive_int
from control.cli.options import positive_seconds
from control.domain.history import check_history_retention
from control.domain.readiness import parse_version
from control.errors import InvalidInput
from control.errors import one_line
from control.logs import add_log_options
from control.logs import configure_logging
from control.settings import DEFAULTS
from control.settings import ServerSettings
from control.webhooks.config import EVENTS
from control.webhooks.config import WebhookSpec

if TYPE_CHECKING:
    from control.web.oidc import OidcSettings


def cmd_serve(args: argparse.Namespace) -> int:
    from control.server import serve

    # Everything the server writes (database, WAL, logs it creates) is owner-only.
    os.umask(0o077)
    configure_logging(args.log_format, args.log_level)
    asyncio.run(serve(settings_from_args(args)))
    return 0


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """The one place `serve`'s flags become settings (tests build in-process servers here)."""
    return ServerSettings(
        data_dir=Path(args.data_dir),
        grpc_address=args.grpc,
        http_address=args.http,
        enroll_address=args.enroll or "",
        insecure=args.insecure,
        ack_deadline=args.ack_deadline,
        heartbeat_interval=args.heartbeat,
        lease_ttl=args.lease_ttl,
        prometheus=tuple(args.prometheus),
        runbook_tick=args.runbook_tick,
        database=args.database,
        history_retention=args.history_retention,
        public_url=args.public_url,
        metrics_address=args.metrics_listen,
        audit_checkpoints=args.audit_checkpoints,
        audit_checkpoint_interval=args.audit_checkpoint_interval,
        audit_syslog=args.audit_syslog,
        **_readiness_settings(args),
        oidc=_oidc_settings(args),
        webhooks=tuple(args.webhook),
        webhook_secret_file=args.webhook_secret_file,
        enrol_rate=args.enrol_rate,
        enrol_burst=args.enrol_burst,
    )


def prometheus_source(text: str) -> tuple[str, str]:
    from control.prometheus_sources import parse_source  # aiohttp: only `serve` needs it

    return parse_argument(parse_source, text, ValueError)


def history_retention(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    try:
        return check_history_retention(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} {exc}") from None


def _add_defaulted(
    parser: Any,
    flag: str,
    default: float,
    help_text: str,
    *,
    parse: Callable[[str], float] = positive_seconds,
    metavar: str | None = None,
) -> None:
    """A flag of ``parser`` (or of its argument group) whose help ends with its default:
    the server's own (``DEFAULTS``), so the two cannot drift apart."""
    parser.add_argument(
        flag,
        type=parse,
        default=default,
        metavar=metavar,
        help=f"{help_text} (default {default:g})",
    )


def add_command(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the control server")
    serve.add_argument("--data-dir", required=True, help="directory for the SQLite state and CA")
    add_database_option(serve, "the state; every replica of one fleet names the same one")
    serve.add_argument("--grpc", default=DEFAULTS.grpc_address, help="gRPC listen address (mTLS)")
    serve.add_argument("--http", default=DEFAULTS.http_address, help="HTTP listen address (probes)")
    serve.add_argument(
        "--enroll", help="agent enrolment listen address (TLS; default: the gRPC port + 1)"
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and claimed identities: development only, loopback only",
    )
    _add_defaulted(
        serve,
        "--ack-deadline",
        DEFAULTS.ack_deadline,
        "seconds before an unacknowledged agent is OVERDUE",
    )
    _add_defaulted(
        serve,
        "--heartbeat",
        DEFAULTS.heartbeat_interval,
        "heartbeat interval the server asks agents for",
    )
    _add_defaulted(
        serve,
        "--lease-ttl",
        DEFAULTS.lease_ttl,
        "capture lease length; agents renew at a third of it",
    )
    serve.add_argument(
        "--prometheus",
        type=prometheus_source,
        action="append",
        default=[],
        metavar="NAME=URL",
        help="a Prometheus runbook gates may query, by NAME (repeatable); runbooks name no URL",
    )
    _add_defaulted(
        serve,
        "--runbook-tick",
        DEFAULTS.runbook_tick,
        "how often active runbook runs evaluate their gates",
    )
    serve.add_argument(
        "--history-retention",
        type=history_retention,
        default=DEFAULTS.history_retention,
        metavar="SECONDS",
        help="archive lifted holds, decided resume requests and ended runbook runs this"
        " long after they finished; the audit log keeps everything"
        f" (default {DEFAULTS.history_retention:.0f}: 7 days)",
    )
    _add_web_and_audit_options(serve)
    _add_enrolment_limit_options(serve)
    _add_readiness_options(serve)
    _add_webhook_options(serve)
    add_log_options(serve)
    serve.set_defaults(handler=cmd_serve, local=True)


def _add_web_and_audit_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--public-url",
        default="",
        metavar="URL",
        help="the dashboard as browsers reach it, e.g. https://killswitch.example.com behind a"
        " TLS proxy: login links use it, and https makes cookies Secure"
        " (default: http://the --http address)",
    )
    sso = serve.add_argument_group("sign-in with the company's SSO (OpenID Connect)")
    sso.add_argument("--oidc-issuer", default="", metavar="URL", help="the provider's issuer URL")
    sso.add_argument(
        "--oidc-client-id", default="", metavar="ID", help="this dashboard's client id"
    )
    sso.add_argument(
        "--oidc-client-secret-file",
        default="",
        metavar="FILE",
        help="a file holding the client secret (never on the command line)",
    )
    sso.add_argument(
        "--oidc-role",
        action="append",
        default=[],
        metavar="GROUP=ROLE",
        help="people in GROUP (the ID token's groups claim) get ROLE: incident-commander,"
        " approver, sre or employee; repeatable, the first matching one wins; anyone in no"
        " listed group is refused. The provider must allow the redirect URI"
        " PUBLIC-URL/oidc/callback",
    )
    serve.add_argument(
        "--metrics-listen",
        default="",
        metavar="HOST:PORT",
        help="serve /metrics here only, not on the dashboard's --http port"
        " (default: on the --http port)",
    )
    serve.add_argument(
        "--audit-checkpoints",
        default="",
        metavar="DIR",
        help="where signed audit checkpoints go, outside the database"
        " (default: DATA_DIR/audit-checkpoints; not with --insecure)",
    )
    _add_defaulted(
        serve,
        "--audit-checkpoint-interval",
        DEFAULTS.audit_checkpoint_interval,
        "checkpoint the audit head this often if it moved",
        metavar="SECONDS",
    )
    serve.add_argument(
        "--audit-syslog",
        action="store_true",
        help="also send each signed checkpoint to syslog (facility auth)",
    )


def _add_enrolment_limit_options(serve: argparse.ArgumentParser) -> None:
    """The enrolment port's per-source limit (control/rpc/enrolment_gate.py). A fleet
    enrolling from behind one NAT is bounded by the concurrency cap, not by this: a call
    that enrols gives its token back. Raise it for a fuzz campaign or a lab."""
    door = serve.add_argument_group("the enrolment port's limit per source address")
    _add_defaulted(
        door,
        "--enrol-rate",
        DEFAULTS.enrol_rate,
        "failed enrolment calls one source address may make per second, after its burst",
        metavar="CALLS_PER_SECOND",
    )
    _add_defaulted(
        door,
        "--enrol-burst",
        DEFAULTS.enrol_burst,
        "enrolment calls one source address may make at once",
        parse=positive_int,
        metavar="CALLS",
    )


def _oidc_settings(args: argparse.Namespace) -> OidcSettings | None:
    from control.web.oidc import load_settings  # the dashboard (aiohttp): only `serve` needs it

    return load_settings(
        args.oidc_issuer, args.oidc_client_id, args.oidc_client_secret_file, args.oidc_role
    )


def webhook(text: str) -> WebhookSpec:
    from control.webhooks.config import parse_webhook

    return parse_argument(parse_webhook, text, ValueError)


def _add_webhook_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--webhook",
        type=webhook,
        action="append",
        default=[],
        metavar="NAME=URL[,events=E1,E2][,secret-file=F]",
        help="POST signed JSON events to this http(s) URL (repeatable); events: "
        + ", ".join(EVENTS)
        + " (default all)",
    )
    serve.add_argument(
        "--webhook-secret-file",
        default="",
        metavar="FILE",
        help="HMAC-SHA256 key of every webhook without a secret-file= of its own",
    )


def agent_version(text: str) -> str:
    """Checked as the readiness policy reads it, kept as typed."""
    parse_argument(parse_version, text, InvalidInput, one_line)
    return text


def _add_readiness_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--min-agent-version",
        type=agent_version,
        metavar="VERSION",
        help="readiness: agents reporting an older version cannot honour a pause (e.g. 0.2.0)",
    )
    _add_defaulted(
        serve,
        "--readiness-offline-days",
        DEFAULTS.readiness_offline_days,
        "readiness: agents offline longer than this cannot honour a pause",
        metavar="DAYS",
    )
    _add_defaulted(
        serve,
        "--max-clock-skew",
        DEFAULTS.max_clock_skew,
        "readiness: warn of agent clocks further off than this",
        metavar="SECONDS",
    )


def _readiness_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``ServerSettings`` fields the options above set."""
    return {
        "min_agent_version": args.min_agent_version or "",
        "readiness_offline_days": args.readiness_offline_days,
        "max_clock_skew": args.max_clock_skew,
    }
