"""Runbook files: the shipped ones parse, and every broken one is located exactly."""

from __future__ import annotations

import json
import math
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from control import runbook_file
from control.domain.rollout import FROM_APPROVAL
from control.domain.rollout import Gates
from control.domain.rollout import OnFailure
from control.domain.rollout import PrometheusGate
from control.domain.scope import ScopeKind
from control.errors import InvalidInput
from control.runbook_file import RunbookFileError
from control.runbook_file import load_runbook
from control.runbook_file import parse_duration
from control.runbook_file import parse_runbook
from control.untrusted import MAX_DOCUMENT_BYTES

RUNBOOKS = Path(__file__).resolve().parents[1] / "runbooks"


def _schema() -> dict[str, Any]:
    text = resources.files("control").joinpath("runbook.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def _error(text: str) -> RunbookFileError:
    with pytest.raises(RunbookFileError) as caught:
        parse_runbook(text, "broken.yaml")
    return caught.value


# ---------------------------------------------------------------- shipped files


def test_staged_reenable() -> None:
    book, source = load_runbook(RUNBOOKS / "staged-reenable.yaml")
    assert source == (RUNBOOKS / "staged-reenable.yaml").read_text()
    assert (book.name, book.seed, book.hold) == (
        "staged-reenable",
        "staged-reenable-v1",
        FROM_APPROVAL,
    )
    assert book.on_failure is OnFailure.REPAUSE and book.pause is None
    assert [w.share for w in book.waves] == [100, 500, 2500, 5000, 10000]
    assert [w.soak for w in book.waves] == [900, 900, 1800, 1800, 0]
    assert [w.timeout for w in book.waves] == [1800, 1800, 2700, 2700, 1800]
    assert all(w.selector is None and not w.confirm for w in book.waves)
    assert {w.gates for w in book.waves} == {Gates(min_capturing=0.95)}


def test_canary_drill() -> None:
    book, _ = load_runbook(RUNBOOKS / "canary-drill.yaml")
    assert book.hold == FROM_APPROVAL and book.pause is not None
    assert book.pause.scope.kind is ScopeKind.SELECTOR
    assert book.pause.scope.match_labels == {"ring": "canary"}
    assert (book.pause.ticket, book.pause.timeout) == ("DRILL-2026-Q4", 300)
    assert "drill" in book.pause.reason
    [wave] = book.waves
    assert (wave.share, wave.soak, wave.gates.min_capturing) == (10000, 120, 0.95)


@pytest.mark.parametrize("path", sorted(RUNBOOKS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_runbook_parses(path: Path) -> None:
    book, _ = load_runbook(path)
    assert book.name == path.stem


def test_schema_is_valid_draft_2020_12() -> None:
    Draft202012Validator.check_schema(_schema())


# ---------------------------------------------------------------- broken files

PAUSE = "pause:\n  scope: {all: true}\n  reason: drill\n"
LAST = "  - share: 100%\n"

BROKEN: list[tuple[str, str, int | None, str, str]] = [
    # (id, text, line, field, part of the problem)
    (
        "typo",
        f"name: x\nwaves:\n  - name: a\n    share: 5%\n    sook: 10m\n{LAST}",
        5,
        "waves[0].sook",
        "unknown field 'sook' (did you mean 'soak'?); expected one of: name, share",
    ),
    ("typo-not-missing", "name: x\nwavs:\n" + LAST, 2, "wavs", "did you mean 'waves'?"),
    ("wrong-type", f"name: x\nconfirm: 3\nwaves:\n{LAST}", 2, "confirm", "expected true or false"),
    ("needs-quotes", "name: x\nseed: 12\nwaves:\n" + LAST, 2, "seed", "put it in quotes"),
    ("missing-waves", "# header\nname: x\n", 2, "waves", "missing required field 'waves'"),
    (
        "missing-nested",
        "name: x\npause:\n  scope: {all: true}\nwaves:\n" + LAST,
        2,
        "pause.reason",
        "missing required field 'reason'",
    ),
    ("no-waves", "name: x\nwaves: []\n", 2, "waves", "needs at least one wave"),
    ("bad-name", "name: Staged\nwaves:\n" + LAST, 1, "name", "lowercase letters"),
    ("enum", f"name: x\non_failure: boom\nwaves:\n{LAST}", 2, "on_failure", "repause, halt"),
    (
        "share-and-selector",
        "name: x\nwaves:\n  - share: 100%\n    selector: {ring: canary}\n",
        3,
        "waves[0]",
        "exactly one of share or selector",
    ),
    (
        "not-growing",
        f"name: x\nwaves:\n  - share: 5%\n  - share: 5%\n{LAST}",
        4,
        "waves[1].share",
        "must grow: 5% is not more than the 5% of wave 1",
    ),
    (
        "last-not-100",
        "name: x\nwaves:\n  - share: 5%\n  - share: 50%\n",
        4,
        "waves[1].share",
        "last wave must be share: 100%",
    ),
    (
        "last-is-selector",
        "name: x\nwaves:\n  - selector: {ring: canary}\n",
        3,
        "waves[0].selector",
        "last wave must be share: 100%",
    ),
    ("share-over-100", "name: x\nwaves:\n  - share: 150%\n", 3, "waves[0].share", "0% to 100%"),
    ("share-zero", f"name: x\nwaves:\n  - share: 0%\n{LAST}", 3, "waves[0].share", "more than 0%"),
    ("share-finer", f"name: x\nwaves:\n  - share: 0.005\n{LAST}", 3, "waves[0].share", "0.01%"),
    ("share-nan", "name: x\nwaves:\n  - share: .nan\n", 3, "waves[0].share", "0% to 100%"),
    (
        "timeout-below-soak",
        "name: x\nwaves:\n  - share: 100%\n    soak: 20m\n    timeout: 10m\n",
        5,
        "waves[0].timeout",
        "timeout (600s) is shorter than soak (1200s)",
    ),
    (
        "default-soak-above-default-timeout",
        "name: x\ndefaults:\n  soak: 20m\nwaves:\n" + LAST,
        3,
        "defaults.soak",
        "shorter than soak",
    ),
    (
        "zero-timeout",
        "name: x\nwaves:\n  - share: 100%\n    soak: 0\n    timeout: 0\n",
        5,
        "waves[0].timeout",
        "more than 0",
    ),
    (
        "bad-duration",
        "name: x\nwaves:\n  - share: 100%\n    soak: 10 minutes\n",
        4,
        "waves[0].soak",
        "expected a duration like 90s, 15m or 1h30m, or a number of seconds, got the text",
    ),
    (
        "ms-duration",
        "name: x\ndefaults:\n  soak: 500ms\nwaves:\n" + LAST,
        3,
        "defaults.soak",
        "90s",
    ),
    (
        "pause-with-hold-id",
        f"name: x\nhold: hold-0123456789ab\n{PAUSE}waves:\n{LAST}",
        2,
        "hold",
        "creates its own hold",
    ),
    ("bad-hold", "name: x\nhold: incident\nwaves:\n" + LAST, 2, "hold", "hold-0123456789ab"),
    (
        "bad-selector-label",
        f"name: x\nwaves:\n  - selector:\n      ring!: canary\n{LAST}",
        4,
        'waves[0].selector["ring!"]',
        "invalid label key 'ring!'",
    ),
    (
        "empty-selector",
        f"name: x\nwaves:\n  - selector: {{}}\n{LAST}",
        3,
        "waves[0].selector",
        "at least one label",
    ),
    (
        "bad-agent-id",
        "name: x\npause:\n  scope:\n    agents: [ok, 'not ok']\n  reason: r\nwaves:\n" + LAST,
        4,
        "pause.scope.agents[1]",
        "invalid agent id 'not ok'",
    ),
    (
        "two-scopes",
        "name: x\npause:\n  scope: {all: true, agents: [a]}\n  reason: r\nwaves:\n" + LAST,
        3,
        "pause.scope",
        "exactly one of all",
    ),
    (
        "empty-reason",
        "name: x\npause:\n  scope: {all: true}\n  reason: ' '\nwaves:\n" + LAST,
        4,
        "pause.reason",
        "reason is required",
    ),
    (
        "bad-ticket",
        f"name: x\n{PAUSE}  ticket: INC 1\nwaves:\n{LAST}",
        5,
        "pause.ticket",
        "invalid ticket 'INC 1'",
    ),
    (
        "prometheus-without-bounds",
        "name: x\nwaves:\n  - share: 100%\n    gates:\n      prometheus: {source: p, query: up}\n",
        5,
        "waves[0].gates.prometheus",
        "at least one of max or min",
    ),
    (
        # The server would fetch whatever a runbook named (SSRF): sources are named only.
        "prometheus-raw-url",
        "name: x\nwaves:\n  - share: 100%\n    gates:\n      prometheus:\n"
        "        {source: main, url: 'http://169.254.169.254/', query: up, max: 1}\n",
        6,
        "waves[0].gates.prometheus.url",
        "unknown field 'url'",
    ),
    (
        "prometheus-source-is-a-url",
        "name: x\nwaves:\n  - share: 100%\n    gates:\n"
        "      prometheus: {source: 'http://10.0.0.1', query: up, max: 1}\n",
        5,
        "waves[0].gates.prometheus.source",
        "never a URL",
    ),
    (
        "prometheus-without-source",
        "name: x\nwaves:\n  - share: 100%\n    gates:\n      prometheus: {query: up, max: 1}\n",
        5,
        "waves[0].gates.prometheus.source",
        "missing required field 'source'",
    ),
    (
        "prometheus-min-over-max",
        "name: x\ndefaults:\n  gates:\n    prometheus: {source: p, query: up, min: 2, max: 1}\n"
        "waves:\n" + LAST,
        4,
        "defaults.gates.prometheus.min",
        "min is more than max",
    ),
    (
        "negative-count",
        "name: x\nwaves:\n  - share: 100%\n    gates: {nacks: -1}\n",
        4,
        "waves[0].gates.nacks",
        "must be at least 0",
    ),
    (
        "duplicate-key",
        "name: x\nwaves:\n  - share: 50%\n    soak: 1m\n    soak: 2m\n" + LAST,
        5,
        "waves[0].soak",
        "given twice (first on line 4)",
    ),
    ("yes-as-key", "name: x\nyes: 1\nwaves:\n" + LAST, 2, "yes", "put it in quotes"),
    (
        "yaml-syntax",
        "name: x\nwaves:\n  - share: 100%\n   soak: 1m\n",
        4,
        "",
        "invalid YAML: while parsing a block collection",
    ),
    ("yaml-tab", "name: x\nwaves:\n\t- share: 100%\n", 3, "", "indent with spaces, not tabs"),
    ("two-documents", "name: x\n---\nname: y\n", 2, "", "expected a single document"),
    ("python-tag", "name: !!python/object:os.system x\n", 1, "", "could not determine"),
    ("control-char", "name: x\n\x07\n", 2, "", "U+0007"),
    (
        "merged-wave",
        f"name: x\nwaves:\n  - {{share: 50%}}\n  - <<: {{share: 40%, soak: 2m}}\n{LAST}",
        4,
        "waves[1].share",
        "must grow",
    ),
    (
        "anchor",
        f"name: x\nwaves:\n  - &w {{share: 50%}}\n{LAST}",
        3,
        "",
        "YAML anchors ('&w') are not allowed; write the value out",
    ),
    ("alias", "name: x\nseed: *s\n", 2, "", "YAML aliases ('*s') are not allowed"),
    ("nested-too-deeply", "[" * sys.getrecursionlimit(), 1, "", "nested over 20 levels deep"),
    ("long-number", f"name: x\nseed: {'1' * 5000}\n", 2, "", "a number over 100 characters"),
    ("empty-file", "", None, "", "the file is empty"),
    ("only-comments", "# nothing yet\n", None, "", "the file is empty"),
    ("list-document", "\n- name: x\n", 2, "", "must be a mapping"),
    ("scalar-document", "staged-reenable\n", 1, "", "must be a mapping"),
    (
        "first-by-line",
        "name: x\nconfirm: 3\nwaves:\n  - share: 100%\n    sook: 1m\ndescription: 5\n",
        2,
        "confirm",
        "expected true or false",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "field", "problem"), [case[1:] for case in BROKEN], ids=[c[0] for c in BROKEN]
)
def test_broken_runbook_is_located(text: str, line: int | None, field: str, problem: str) -> None:
    error = _error(text)
    assert (error.file_name, error.line, error.field) == ("broken.yaml", line, field)
    assert problem in error.problem
    where = "broken.yaml" if line is None else f"broken.yaml:{line}"
    assert str(error) == ": ".join(p for p in (where, field, error.problem) if p)
    assert "\n" not in str(error) and isinstance(error, InvalidInput)


def test_error_text_omits_unknown_parts() -> None:
    assert str(RunbookFileError("a.yaml", None, "", "no\nluck")) == "a.yaml: no luck"
    assert str(RunbookFileError("a.yaml", 3, "waves[0]", "bad")) == "a.yaml:3: waves[0]: bad"


def test_domain_check_is_the_last_resort(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runbook_file, "_check_order", lambda waves: None)
    error = _error("name: x\nwaves:\n  - share: 50%\n")
    assert (error.line, error.field) == (None, "")
    assert "last wave must re-enable 100%" in error.problem


def test_self_referencing_alias_is_refused_not_followed() -> None:
    assert _error("name: x\nwaves: &w\n  - *w\n").problem.startswith("YAML anchors")


# ---------------------------------------------------------------- reading files


def test_load_runbook_errors(tmp_path: Path) -> None:
    with pytest.raises(RunbookFileError, match="cannot read the file"):
        load_runbook(tmp_path / "missing.yaml")
    with pytest.raises(RunbookFileError, match="cannot read the file"):
        load_runbook(tmp_path)
    big = tmp_path / "big.yaml"
    big.write_text("#" * (MAX_DOCUMENT_BYTES + 1))
    with pytest.raises(RunbookFileError, match="over 32 KiB"):
        load_runbook(big)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: x\ndescription: caf\xe9\n")
    with pytest.raises(RunbookFileError) as caught:
        load_runbook(latin)
    assert (caught.value.file_name, caught.value.line) == (str(latin), 2)
    assert "not UTF-8" in caught.value.problem


def test_parse_rejects_oversized_text() -> None:
    with pytest.raises(RunbookFileError, match="over 32 KiB"):
        parse_runbook("#" * (MAX_DOCUMENT_BYTES + 1))


# ---------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        *[("90s", 90), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("1h0m5s", 3605)],
        *[("0s", 0), (0, 0), (12.5, 12.5), (600, 600)],
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


BAD_DURATIONS: list[object] = ["500ms", "", "1.5h", "30m1h", "90", "1 h", "-1s", -1, True, None]


@pytest.mark.parametrize("value", [*BAD_DURATIONS, math.nan, math.inf], ids=repr)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(InvalidInput, match="invalid duration"):
        parse_duration(value)


def test_schema_duration_pattern_agrees_with_parse_duration() -> None:
    pattern = _schema()["$defs"]["duration"]["anyOf"][0]["pattern"]
    for text in ["90s", "10m", "1h30m", "0s", *(v for v in BAD_DURATIONS if isinstance(v, str))]:
        try:
            parse_duration(text)
            accepted = True
        except InvalidInput:
            accepted = False
        assert bool(re.search(pattern, text)) == accepted, text


def test_defaults_merge_key_by_key() -> None:
    book = parse_runbook(
        "name: x\nconfirm: true\ndefaults:\n  soak: 1m\n  timeout: 5m\n  gates:\n"
        "    capturing: 90%\n    nacks: 2\n"
        "    prometheus: {source: main, query: up, min: 1}\n"
        "waves:\n"
        "  - selector: {ring: canary}\n    confirm: false\n    gates: {nacks: 0, overdue: 3}\n"
        "  - share: 0.5\n  - share: 100\n    soak: 2m\n    gates: {capturing: 0}\n"
    )
    first, second, last = book.waves
    prometheus = PrometheusGate("up", source="main", min_value=1.0)
    assert first.gates == Gates(0.9, max_nacks=0, max_overdue=3, prometheus=prometheus)
    assert second.gates == Gates(0.9, max_nacks=2, prometheus=prometheus)
    assert last.gates == Gates(0.0, max_nacks=2, prometheus=prometheus)
    assert [w.selector for w in book.waves] == [{"ring": "canary"}, None, None]
    assert [w.share for w in book.waves] == [None, 50, 10000]
    assert [(w.soak, w.timeout) for w in book.waves] == [(60, 300), (60, 300), (120, 300)]
    assert [w.confirm for w in book.waves] == [False, True, True]
    assert [w.name for w in book.waves] == ["wave 1", "wave 2", "wave 3"]


def test_domain_defaults_and_yaml_merge_keys() -> None:
    book = parse_runbook(
        "name: x\nwaves:\n  - {share: 50%, soak: 2m}\n  - <<: {share: 50%, soak: 2m}\n"
        "    share: 100%\n"
    )
    assert (book.seed, book.hold, book.on_failure) == ("x", FROM_APPROVAL, OnFailure.REPAUSE)
    assert [(w.share, w.soak, w.timeout) for w in book.waves] == [
        (5000, 120, 900),
        (10000, 120, 900),
    ]
    assert book.waves[0].gates == Gates()
