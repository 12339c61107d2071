"""Prometheus gate sources: named in the server's configuration, never in a runbook.

A runbook is text that automation may submit, so a URL in it would let anyone who
can plan or start a runbook make the server fetch any address it can reach (SSRF),
follow a redirect to another, and show what came back in the gate results. Here the
operator who starts the server names the sources (``serve --prometheus NAME=URL``),
a runbook refers to one by name, redirects are never followed, and a source's answer
is reduced to a number or to a fixed one-line reason: its body is never repeated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import aiohttp

from control.domain.rollout import PrometheusGate
from control.domain.rollout import PrometheusReading
from control.domain.rollout import Runbook
from control.errors import InvalidInput
from control.untrusted import MAX_DOCUMENT_BYTES
from control.untrusted import DocumentRefused
from control.untrusted import load_json
from control.untrusted import off_loop

SOURCE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
QUERY_TIMEOUT_SECONDS = 5.0
# Prometheus' own error types (its API's ``errorType``): a fixed set, safe to repeat.
KNOWN_ERROR_TYPES = frozenset(
    {"bad_data", "timeout", "canceled", "execution", "internal", "unavailable", "not_found"}
)


def parse_source(text: str) -> tuple[str, str]:
    """``NAME=URL`` from the command line; ValueError says what is wrong in one line."""
    name, equals, url = text.partition("=")
    name, url = name.strip(), url.strip()
    if not equals or not SOURCE_NAME.match(name):
        raise ValueError(
            f"{text!r}: expected NAME=URL, NAME lower-case letters, digits, - or _ (at most 40)"
        )
    if not re.match(r"^https?://[^\s/?#]+[^\s?#]*$", url):
        raise ValueError(f"{text!r}: the URL must be http:// or https://, without query")
    return name, url.rstrip("/")


class PrometheusSources:
    """The configured sources, and the only code that queries them."""

    def __init__(self, sources: Sequence[tuple[str, str]]) -> None:
        self._urls = dict(sources)
        if len(self._urls) < len(sources):
            raise InvalidInput("--prometheus: each NAME may be given once")

    def check(self, book: Runbook) -> None:
        """Refuse a runbook naming a source this server does not have, before it runs."""
        for index, wave in enumerate(book.waves):
            gate = wave.gates.prometheus
            if gate is not None and gate.source not in self._urls:
                known = ", ".join(sorted(self._urls)) or "none (serve --prometheus NAME=URL)"
                raise InvalidInput(
                    f"runbook {book.name!r} wave {index + 1}: unknown Prometheus source"
                    f" {gate.source!r}; this server's sources: {known}"
                )

    async def query(self, gate: PrometheusGate) -> PrometheusReading:
        """One instant query; any failure is a reading with an error, never an exception."""
        name = gate.source
        url = self._urls.get(name)
        if url is None:  # the source was removed from the configuration during a run
            return PrometheusReading(error=f"prometheus source {name!r} is not configured")
        timeout = aiohttp.ClientTimeout(total=QUERY_TIMEOUT_SECONDS)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(
                    f"{url}/api/v1/query", params={"query": gate.query}, allow_redirects=False
                ) as response,
            ):
                if response.status != 200:
                    return PrometheusReading(error=_status_error(name, response.status))
                # read() may stop short of n: read on to one byte over the cap.
                raw = b""
                while len(raw) <= MAX_DOCUMENT_BYTES and (
                    chunk := await response.content.read(MAX_DOCUMENT_BYTES + 1 - len(raw))
                ):
                    raw += chunk
        except TimeoutError:
            return PrometheusReading(
                error=f"prometheus {name!r} did not answer within {QUERY_TIMEOUT_SECONDS:g}s"
            )
        except aiohttp.ClientError as exc:
            why = type(exc).__name__
            return PrometheusReading(error=f"prometheus {name!r} unreachable ({why})")
        if len(raw) > MAX_DOCUMENT_BYTES:
            size = f"{MAX_DOCUMENT_BYTES // 1024} KiB"
            return PrometheusReading(error=f"prometheus {name!r} answered more than {size}")
        try:  # within control.untrusted's caps (a deep nesting once raised RecursionError)
            body = await off_loop(load_json, raw, "the answer")
        except DocumentRefused:
            return PrometheusReading(error=f"prometheus {name!r} did not answer usable JSON")
        return prometheus_value(name, body)


def _status_error(name: str, status: int) -> str:
    if 300 <= status < 400:
        return f"prometheus {name!r} answered HTTP {status}; redirects are not followed"
    return f"prometheus {name!r} answered HTTP {status}"


def prometheus_value(name: str, body: object) -> PrometheusReading:
    """The single number an instant query answered, or why there is none (never its text)."""
    if not isinstance(body, dict) or body.get("status") != "success":
        kind = body.get("errorType") if isinstance(body, dict) else None
        known = f" ({kind})" if isinstance(kind, str) and kind in KNOWN_ERROR_TYPES else ""
        return PrometheusReading(error=f"prometheus {name!r} refused the query{known}")
    data = body.get("data") or {}
    result: Any = data.get("result") if isinstance(data, dict) else None
    kind = data.get("resultType") if isinstance(data, dict) else None
    try:
        if kind == "scalar":
            value = float(result[1])
        elif kind == "vector":
            if not result:
                return PrometheusReading()
            if len(result) > 1:
                return PrometheusReading(
                    error=f"query returned {len(result)} series; aggregate it to one"
                )
            value = float(result[0]["value"][1])
        else:
            return PrometheusReading(error="unsupported result type: expected scalar or vector")
    except (TypeError, ValueError, IndexError, KeyError):
        return PrometheusReading(error="malformed query result")
    if math.isnan(value):
        return PrometheusReading(error="query returned NaN")
    return PrometheusReading(value=value)
