"""`killswitch serve` options for what faces outside: the dashboard's public URL and
its SSO sign-in, /metrics' own address, where signed audit checkpoints go, and
webhooks (kept out of cli.py, which is big enough)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from control.audit_checkpoints import DEFAULT_INTERVAL as DEFAULT_CHECKPOINT_INTERVAL
from control.rpc.enrolment_gate import ENROL_BURST, ENROL_PER_SECOND
from control.web.oidc import OidcSettings, load_settings
from control.webhooks.config import EVENTS, WebhookSpec


def add_serve_web_and_audit_options(
    serve: argparse.ArgumentParser, seconds: Callable[[str], float]
) -> None:
    """``seconds``: the CLI's parser of a positive number of seconds."""
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
    serve.add_argument(
        "--audit-checkpoint-interval",
        type=seconds,
        default=DEFAULT_CHECKPOINT_INTERVAL,
        metavar="SECONDS",
        help="checkpoint the audit head this often if it moved"
        f" (default {DEFAULT_CHECKPOINT_INTERVAL:.0f})",
    )
    serve.add_argument(
        "--audit-syslog",
        action="store_true",
        help="also send each signed checkpoint to syslog (facility auth)",
    )


def add_enrolment_limit_options(
    serve: argparse.ArgumentParser,
    rate: Callable[[str], float],
    burst: Callable[[str], int],
) -> None:
    """The enrolment port's per-source limit (control/rpc/enrolment_gate.py). A fleet
    enrolling from behind one NAT is bounded by the concurrency cap, not by this: a call
    that enrols gives its token back. Raise it for a fuzz campaign or a lab."""
    door = serve.add_argument_group("the enrolment port's limit per source address")
    door.add_argument(
        "--enrol-rate",
        type=rate,
        default=ENROL_PER_SECOND,
        metavar="CALLS_PER_SECOND",
        help="failed enrolment calls one source address may make per second, after its burst"
        f" (default {ENROL_PER_SECOND:g})",
    )
    door.add_argument(
        "--enrol-burst",
        type=burst,
        default=ENROL_BURST,
        metavar="CALLS",
        help=f"enrolment calls one source address may make at once (default {ENROL_BURST})",
    )


def oidc_settings(args: argparse.Namespace) -> OidcSettings | None:
    return load_settings(
        args.oidc_issuer, args.oidc_client_id, args.oidc_client_secret_file, args.oidc_role
    )


def webhook(text: str) -> WebhookSpec:
    from control.webhooks.config import parse_webhook

    try:
        return parse_webhook(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_webhook_options(serve: argparse.ArgumentParser) -> None:
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
