"""Prometheus gate sources without a server: the flag's syntax, and answers reduced to a
number or a fixed reason (the end-to-end checks are in test_least_privilege_e2e.py)."""

from __future__ import annotations

import pytest

from control.errors import InvalidInput
from control.prometheus_sources import PrometheusSources
from control.prometheus_sources import parse_source
from control.prometheus_sources import prometheus_value


def test_a_source_is_a_name_and_an_http_url() -> None:
    assert parse_source("main=http://prom:9090/") == ("main", "http://prom:9090")
    assert parse_source("eu-1=https://prom.example/prefix") == (
        "eu-1",
        "https://prom.example/prefix",
    )


@pytest.mark.parametrize(
    "text",
    ["http://prom:9090", "=http://prom", "Main=http://prom", "main=file:///etc/passwd", "main="],
)
def test_malformed_sources_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"NAME=URL|http"):
        parse_source(text)


def test_a_name_is_configured_once() -> None:
    with pytest.raises(InvalidInput, match="once"):
        PrometheusSources((("main", "http://a"), ("main", "http://b")))


@pytest.mark.parametrize(
    "body",
    [
        {"status": "error", "errorType": "bad_data", "error": "SECRET"},
        {"status": "error", "errorType": "SECRET", "error": "x"},
        {"status": "success", "data": {"resultType": "SECRET", "result": []}},
        ["SECRET"],
    ],
)
def test_what_a_source_answers_is_never_repeated(body: object) -> None:
    reading = prometheus_value("main", body)
    assert reading.value is None and reading.error
    assert "SECRET" not in reading.error
