"""``serve --webhook NAME=URL[,events=E1,E2...][,secret-file=PATH]``: where events go.

Only http(s) URLs the operator names; every webhook is signed, with its own secret
file or the ``--webhook-secret-file`` shared by all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from control.errors import InvalidInput

# What a webhook can hear; every one of them unless ``events=`` narrows it.
EVENTS = (
    "pause_issued",
    "resume_requested",
    "resume_approved",
    "resume_denied",
    "fleet_compliant",
    "violation",
    "runbook_wave",
    "runbook_halt",
)
MIN_SECRET_BYTES = 16


@dataclass(frozen=True, slots=True)
class WebhookSpec:
    """As parsed from the command line: the secret is still a file name."""

    name: str
    url: str
    events: frozenset[str]
    secret_file: str = ""


@dataclass(frozen=True, slots=True)
class Webhook:
    name: str
    url: str
    events: frozenset[str]
    secret: bytes


def parse_webhook(text: str) -> WebhookSpec:
    """``NAME=URL`` then ``,events=A,B`` (names run on until the next ``key=``) and
    ``,secret-file=PATH``."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest:
        raise ValueError(f"bad --webhook {text!r}: expected NAME=URL[,events=...]")
    url, *options = rest.split(",")
    check_url(url)
    events: set[str] = set()
    secret_file = ""
    key = ""
    for option in options:
        if "=" in option:
            key, _, value = option.partition("=")
        else:
            value = option  # another event name after events=
        if key == "events":
            events.add(value.strip())
        elif key == "secret-file" and value:
            secret_file = value
        else:
            raise ValueError(f"bad --webhook option {option!r}: expected events= or secret-file=")
    unknown = events - set(EVENTS)
    if unknown:
        known = ", ".join(EVENTS)
        raise ValueError(f"unknown webhook event(s) {', '.join(sorted(unknown))}: one of {known}")
    return WebhookSpec(name.strip(), url, frozenset(events or EVENTS), secret_file)


def check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"webhook URL {url!r} must be http:// or https:// with a host")


def load_webhooks(specs: tuple[WebhookSpec, ...], shared_secret_file: str) -> list[Webhook]:
    """Read every secret now, so a missing file stops the server at start."""
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise InvalidInput("two --webhook options share a NAME")
    return [
        Webhook(spec.name, spec.url, spec.events, _secret(spec, shared_secret_file))
        for spec in specs
    ]


def _secret(spec: WebhookSpec, shared_secret_file: str) -> bytes:
    path = spec.secret_file or shared_secret_file
    if not path:
        raise InvalidInput(
            f"webhook {spec.name!r} has no secret: give --webhook-secret-file FILE"
            " or secret-file=FILE in the --webhook option"
        )
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise InvalidInput(f"cannot read webhook secret {path}: {exc.strerror}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise InvalidInput(f"webhook secret {path} is shorter than {MIN_SECRET_BYTES} bytes")
    return secret
