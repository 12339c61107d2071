"""Runbook files: YAML text in, a domain ``Runbook`` out, or one error naming file, line and field.

A runbook is read at 3 a.m. during an incident, so every rejection says where
(``FILE:LINE: waves[2].share: ...``, indexes counted from 0) and what to write
instead. Structure and spelling are checked by ``runbook.schema.json`` (which
editors can use too); what a schema cannot say (shares grow, soak <= timeout,
label and agent-id syntax) is checked here with the same kind of location, so
the domain's own checks never see a bad file.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable
from collections.abc import Mapping
from decimal import Decimal
from functools import cache
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Any
from typing import TypeVar

import yaml
from jsonschema import Draft202012Validator
from jsonschema import ValidationError
from jsonschema.exceptions import best_match
from jsonschema.exceptions import by_relevance

from control.domain.holds import validate_reason
from control.domain.holds import validate_ticket
from control.domain.release import FULL_SHARE
from control.domain.release import format_share
from control.domain.rollout import DEFAULT_PAUSE_TIMEOUT_SECONDS
from control.domain.rollout import DEFAULT_SOAK_SECONDS
from control.domain.rollout import DEFAULT_WAVE_TIMEOUT_SECONDS
from control.domain.rollout import FROM_APPROVAL
from control.domain.rollout import Gates
from control.domain.rollout import OnFailure
from control.domain.rollout import PauseStep
from control.domain.rollout import PrometheusGate
from control.domain.rollout import Runbook
from control.domain.rollout import Wave
from control.domain.scope import Scope
from control.domain.scope import validate_agent_id
from control.domain.scope import validate_labels
from control.errors import InvalidInput
from control.errors import shown
from control.untrusted import MAX_DOCUMENT_BYTES
from control.untrusted import DocumentRefused
from control.untrusted import GuardedYamlLoader

_TOO_LARGE = f"the file is over {MAX_DOCUMENT_BYTES // 1024} KiB; a runbook is a short text file"

_MAX_SCHEMA_ERRORS = 50

_Path = tuple[str | int, ...]
_T = TypeVar("_T")
_R = TypeVar("_R")

_DURATION = re.compile(r"^(?=\d)(?:(\d{1,9})h)?(?:(\d{1,9})m)?(?:(\d{1,9})s)?$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# A typo'd key beats every other complaint about the same mapping; "none of the
# alternatives matched" is the vaguest one.
_RELEVANCE = by_relevance(weak={"anyOf", "oneOf"}, strong={"additionalProperties"})
# Keywords whose failure is best told by the schema's description of the value.
_DESCRIBED = frozenset(
    {
        "pattern",
        "anyOf",
        "oneOf",
        "minimum",
        "maximum",
        "minItems",
        "minProperties",
        "maxProperties",
    }
)
_TYPE_NAMES = {
    "string": "text",
    "number": "a number",
    "integer": "a whole number",
    "boolean": "true or false",
    "object": "a mapping (key: value lines)",
    "array": "a list",
    "null": "nothing",
}


class RunbookFileError(InvalidInput):
    """A runbook file that cannot be used, located as precisely as the text allows."""

    def __init__(self, file_name: str, line: int | None, field: str, problem: str) -> None:
        self.file_name = file_name
        self.line = line
        self.field = field
        self.problem = " ".join(problem.split())
        where = file_name + (f":{line}" if line is not None else "")
        super().__init__(": ".join(part for part in (where, field, self.problem) if part))


class _Invalid(Exception):
    """A problem at a path of the document; ``parse_runbook`` adds the file and the line."""

    def __init__(self, path: _Path, problem: str, line: int | None = None) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem
        self.line = line


def load_runbook(path: Path) -> tuple[Runbook, str]:
    """The parsed runbook and its text, which a run stores so it can be replayed exactly."""
    name = str(path)
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise RunbookFileError(
            name, None, "", f"cannot read the file: {exc.strerror or exc}"
        ) from None
    if len(data) > MAX_DOCUMENT_BYTES:
        raise RunbookFileError(name, None, "", _TOO_LARGE)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        problem = f"not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
        raise RunbookFileError(name, line, "", problem) from None
    return parse_runbook(text, name), text


def parse_runbook(text: str, file_name: str = "<runbook>") -> Runbook:
    """The domain runbook written in ``text``; ``file_name`` only labels the errors.

    The text may be anyone's: it is read within ``control.untrusted``'s caps, and the
    server calls this through ``untrusted.off_loop``."""
    root, document = _read_yaml(text, file_name)
    try:
        _check_schema(root, document)
        return _runbook(document)
    except _Invalid as exc:
        line = exc.line if exc.line is not None else _line(root, exc.path)
        raise RunbookFileError(file_name, line, _field(exc.path), exc.problem) from None
    except InvalidInput as exc:  # a check this module missed: still one clear line
        raise RunbookFileError(file_name, None, "", str(exc)) from None


def parse_duration(value: object) -> float:
    """Seconds from ``90s``, ``15m``, ``1h30m`` or a plain non-negative number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value) and value >= 0:
            return float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        hours, minutes, seconds = (int(part or 0) for part in match.groups())
        return float(hours * 3600 + minutes * 60 + seconds)
    raise InvalidInput(
        f"invalid duration {shown(value)}: use 90s, 15m, 1h30m or a number of seconds"
    )


# ---------------------------------------------------------------- YAML


def _read_yaml(text: str, file_name: str) -> tuple[yaml.Node, Any]:
    """Compose (keeping line marks), check the keys, then construct as ``safe_load`` would,
    but with no anchors or aliases and within the caps (``GuardedYamlLoader``)."""
    loader: GuardedYamlLoader | None = None
    try:
        loader = GuardedYamlLoader(text)
        root = loader.get_single_node()
        if root is None:
            raise _Invalid((), "the file is empty; a runbook needs at least name and waves")
        if not isinstance(root, yaml.MappingNode):
            line = root.start_mark.line + 1
            raise _Invalid((), "a runbook must be a mapping (name: ..., waves: ...)", line)
        _check_keys(root, ())
        return root, loader.construct_document(root)
    except DocumentRefused as exc:
        raise RunbookFileError(file_name, exc.line, "", exc.problem) from None
    except _Invalid as exc:
        raise RunbookFileError(file_name, exc.line, _field(exc.path), exc.problem) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = "invalid YAML: " + ", ".join(filter(None, (exc.context, exc.problem)))
        lines = text.splitlines()
        row = lines[mark.line][: mark.column + 1] if mark and mark.line < len(lines) else ""
        if "\t" in row:
            problem += "; indent with spaces, not tabs"
        elif "block" in (exc.context or ""):
            problem += "; check the indentation"
        raise RunbookFileError(file_name, mark.line + 1 if mark else None, "", problem) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        problem = f"invalid YAML: character U+{exc.character:04X} is not allowed here"
        raise RunbookFileError(file_name, line, "", problem) from None
    except yaml.YAMLError as exc:
        raise RunbookFileError(file_name, None, "", f"invalid YAML: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_keys(node: yaml.Node, path: _Path) -> None:
    """Field names must be text, and given once: PyYAML would silently keep the last one."""
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_keys(item, (*path, index))
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[str, yaml.Node] = {}
    for key, value in node.value:
        if key.tag == _MERGE_TAG:
            _check_keys(value, path)
            continue
        line = key.start_mark.line + 1
        if not isinstance(key, yaml.ScalarNode):
            raise _Invalid(path, "a field name must be plain text, not a list or mapping", line)
        if key.tag != _STR_TAG:
            problem = f"field name {key.value!r} is not plain text to YAML; put it in quotes"
            raise _Invalid((*path, key.value), problem, line)
        if key.value in first:
            earlier = first[key.value].start_mark.line + 1
            raise _Invalid((*path, key.value), f"given twice (first on line {earlier})", line)
        first[key.value] = key
        _check_keys(value, (*path, key.value))


def _line(root: yaml.Node, path: _Path) -> int:
    """The line of the deepest node on ``path`` that exists; a mapping member's is its key's."""
    node, line = root, root.start_mark.line + 1
    for part in path:
        if isinstance(node, yaml.MappingNode):
            matches = [(k, v) for k, v in node.value if k.value == part]
            if not matches:
                break
            key, node = matches[-1]  # after a merge (<<) the last one counts
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _field(path: _Path) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _IDENTIFIER.match(part):
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part)}]"
    return text


# ---------------------------------------------------------------- schema


@cache
def _validator() -> Draft202012Validator:
    schema = json.loads(resources.files("control").joinpath("runbook.schema.json").read_text())
    return Draft202012Validator(schema)


def _check_schema(root: yaml.Node, document: Any) -> None:
    """Report one schema error: the first by line, the most relevant on that line."""
    # Enough to find the first by line in any real file; a hostile one (2000 wrong
    # values) would otherwise cost a jsonschema error object and a line lookup each.
    errors = list(islice(_validator().iter_errors(document), _MAX_SCHEMA_ERRORS))
    # A typo'd key usually explains a missing one; say the typo, not the absence.
    typo_at = {tuple(e.absolute_path) for e in errors if e.validator == "additionalProperties"}
    errors = [
        e
        for e in errors
        if e.validator == "additionalProperties" or tuple(e.absolute_path) not in typo_at
    ]
    best = best_match(errors, key=lambda e: (-_line(root, _explain(e, root)[0]), _RELEVANCE(e)))
    if best is not None:
        raise _Invalid(*_explain(best, root))


def _explain(error: ValidationError, root: yaml.Node) -> tuple[_Path, str]:
    """jsonschema's message rewritten for a tired human, with the path it is about."""
    path: _Path = tuple(error.absolute_path)
    value: Any = error.instance
    expected: Any = error.validator_value
    keyword = error.validator
    if keyword == "additionalProperties" and isinstance(error.schema, dict):
        known = list(error.schema.get("properties", {}))
        unknown = min((k for k in value if k not in known), key=lambda k: _line(root, (*path, k)))
        close = difflib.get_close_matches(unknown, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (*path, unknown), (
            f"unknown field {unknown!r}{hint}; expected one of: {', '.join(known)}"
        )
    if keyword == "required":
        missing = next(k for k in expected if k not in value)
        return (*path, missing), f"missing required field {missing!r}"
    description = _description(error)
    if description and keyword in _DESCRIBED:
        if isinstance(value, dict | list):
            return path, f"needs {description}"
        return path, f"expected {description}, got {_kind(value)}"
    if keyword == "type" and isinstance(expected, str):
        problem = f"expected {_TYPE_NAMES.get(expected, expected)}, got {_kind(value)}"
        if expected == "string" and not isinstance(value, dict | list | type(None)):
            problem += "; put it in quotes"
        return path, problem
    messages: dict[str, Callable[[], str]] = {
        "enum": lambda: f"{shown(value)} is not one of: {', '.join(map(str, expected))}",
        "const": lambda: f"must be {json.dumps(expected)}",
        "minItems": lambda: f"needs at least {expected} entr{'y' if expected == 1 else 'ies'}",
        "minLength": lambda: "must not be empty",
        "maxLength": lambda: f"is too long ({len(value)} characters; at most {expected})",
        "minimum": lambda: f"must be at least {expected}, got {_kind(value)}",
        "maximum": lambda: f"must be at most {expected}, got {_kind(value)}",
    }
    return path, messages[keyword]() if keyword in messages else error.message


def _description(error: ValidationError) -> str:
    """The nearest description: an alternative's own, or the one of the anyOf it belongs to."""
    for candidate in (error, error.parent):
        schema = candidate.schema if candidate is not None else None
        if isinstance(schema, dict) and "description" in schema:
            return str(schema["description"])
    return ""


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "nothing"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the text {shown(value)}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__} ({shown(value)})"


# ---------------------------------------------------------------- meaning


def _runbook(doc: Mapping[str, Any]) -> Runbook:
    """What the schema cannot say, checked where it was written."""
    hold = doc.get("hold", FROM_APPROVAL)
    pause = _pause(doc["pause"]) if "pause" in doc else None
    if pause is not None and hold != FROM_APPROVAL:
        raise _Invalid(
            ("hold",), f"a runbook with a pause step creates its own hold; remove 'hold: {hold}'"
        )
    defaults: Mapping[str, Any] = doc.get("defaults", {})
    _check_gates(defaults.get("gates", {}), ("defaults", "gates"))
    waves = tuple(
        _wave(index, raw, defaults, doc.get("confirm", False))
        for index, raw in enumerate(doc["waves"])
    )
    _check_order(waves)
    return Runbook(
        name=doc["name"],
        seed=doc.get("seed", doc["name"]),
        waves=waves,
        description=doc.get("description", "").strip(),
        hold=hold,
        pause=pause,
        on_failure=OnFailure(doc.get("on_failure", OnFailure.REPAUSE)),
    )


def _wave(index: int, raw: Mapping[str, Any], defaults: Mapping[str, Any], confirm: bool) -> Wave:
    at: _Path = ("waves", index)
    soak, soak_at = _setting("soak", raw, defaults, at, DEFAULT_SOAK_SECONDS)
    timeout, timeout_at = _setting("timeout", raw, defaults, at, DEFAULT_WAVE_TIMEOUT_SECONDS)
    if timeout <= 0:
        raise _Invalid(timeout_at, "timeout must be more than 0")
    if timeout < soak:
        # Blame what this wave wrote before a default that the other waves share.
        written = sorted((timeout_at, soak_at), key=lambda p: (p == at, p[0] != "waves"))
        raise _Invalid(
            written[0],
            f"timeout ({timeout:g}s) is shorter than soak ({soak:g}s): the wave could never pass",
        )
    if "min_agents" in raw and "selector" in raw:
        raise _Invalid(
            (*at, "min_agents"),
            "min_agents applies to share waves only: a selector wave re-enables exactly"
            " the laptops its labels match",
        )
    gates: Mapping[str, Any] = raw.get("gates", {})
    _check_gates(gates, (*at, "gates"))
    return Wave(
        name=raw.get("name", f"wave {index + 1}"),
        share=_share(raw["share"], (*at, "share")) if "share" in raw else None,
        selector=_labels(raw["selector"], (*at, "selector")) if "selector" in raw else None,
        min_agents=raw.get("min_agents", 0),
        soak=soak,
        timeout=timeout,
        confirm=raw.get("confirm", confirm),
        gates=_gates({**defaults.get("gates", {}), **gates}, (*at, "gates")),
    )


def _setting(
    key: str, raw: Mapping[str, Any], defaults: Mapping[str, Any], at: _Path, default: float
) -> tuple[float, _Path]:
    """A wave's duration, from the wave, else ``defaults``, else the domain's default."""
    if key in raw:
        path: _Path = (*at, key)
        return _checked(path, parse_duration, raw[key]), path
    if key in defaults:
        return _checked(("defaults", key), parse_duration, defaults[key]), ("defaults", key)
    return default, at


def _check_order(waves: tuple[Wave, ...]) -> None:
    previous, previous_index = 0, -1
    for index, wave in enumerate(waves):
        if wave.share is None:
            continue
        if wave.share <= previous:
            raise _Invalid(
                ("waves", index, "share"),
                f"shares are cumulative and must grow: {format_share(wave.share)} is not more"
                f" than the {format_share(previous)} of wave {previous_index + 1}",
            )
        previous, previous_index = wave.share, index
    last = len(waves) - 1
    if waves[last].share != FULL_SHARE:
        key = "share" if waves[last].share is not None else "selector"
        raise _Invalid(
            ("waves", last, key),
            "the last wave must be share: 100%, so the run re-enables everyone and can finish",
        )


def _share(value: object, path: _Path) -> int:
    """Basis points: shares compare exactly, and 0.01% is as fine as a hash bucket goes."""
    basis_points = _percent(value, path) * 100
    if basis_points != basis_points.to_integral_value():
        raise _Invalid(path, f"{shown(value)} is finer than 0.01%, the smallest share step")
    if basis_points <= 0:
        raise _Invalid(path, "a share must be more than 0%")
    return int(basis_points)


def _percent(value: object, path: _Path) -> Decimal:
    """Exact decimal percent; the schema already allowed only 0..100 written as 5% or 5."""
    number = Decimal(value[:-1]) if isinstance(value, str) else Decimal(str(value))
    if not number.is_finite():
        raise _Invalid(path, f"expected a percentage from 0% to 100%, got {shown(value)}")
    return number


def _check_gates(gates: Mapping[str, Any], at: _Path) -> None:
    if "capturing" in gates:
        _percent(gates["capturing"], (*at, "capturing"))
    query = gates.get("prometheus", {})
    for bound in ("min", "max"):
        if not math.isfinite(query.get(bound, 0)):
            raise _Invalid((*at, "prometheus", bound), f"{bound} must be a finite number")
    if query.get("min", -math.inf) > query.get("max", math.inf):
        raise _Invalid(
            (*at, "prometheus", "min"), "min is more than max: the gate could never pass"
        )


def _gates(raw: Mapping[str, Any], at: _Path) -> Gates:
    """Gates from a checked, merged mapping (a wave's keys over ``defaults.gates``)."""
    query = raw.get("prometheus")
    return Gates(
        min_capturing=float(_percent(raw.get("capturing", 100), (*at, "capturing")) / 100),
        max_violations=int(raw.get("violations", 0)),
        max_nacks=int(raw.get("nacks", 0)),
        max_overdue=int(raw.get("overdue", 0)),
        prometheus=None
        if query is None
        else PrometheusGate(
            query=query["query"],
            source=query["source"],
            max_value=float(query["max"]) if "max" in query else None,
            min_value=float(query["min"]) if "min" in query else None,
            allow_no_data=query.get("allow_no_data", False),
        ),
    )


def _pause(raw: Mapping[str, Any]) -> PauseStep:
    timeout = _checked(
        ("pause", "timeout"), parse_duration, raw.get("timeout", DEFAULT_PAUSE_TIMEOUT_SECONDS)
    )
    if timeout <= 0:
        raise _Invalid(("pause", "timeout"), "timeout must be more than 0")
    return PauseStep(
        scope=_scope(raw["scope"], ("pause", "scope")),
        reason=_checked(("pause", "reason"), validate_reason, raw["reason"]),
        ticket=_checked(("pause", "ticket"), validate_ticket, raw.get("ticket", "")),
        timeout=timeout,
    )


def _scope(raw: Mapping[str, Any], at: _Path) -> Scope:
    if "selector" in raw:
        return Scope.selector(_labels(raw["selector"], (*at, "selector")))
    if "agents" in raw:
        agents = enumerate(raw["agents"])
        return Scope.agents(_checked((*at, "agents", i), validate_agent_id, a) for i, a in agents)
    return Scope.fleet()


def _labels(raw: Mapping[str, str], at: _Path) -> dict[str, str]:
    for key, value in raw.items():
        _checked((*at, key), validate_labels, {key: value})
    return _checked(at, validate_labels, raw)


def _checked(path: _Path, check: Callable[[_T], _R], value: _T) -> _R:
    """A domain validator's verdict, located in the file."""
    try:
        return check(value)
    except InvalidInput as exc:
        raise _Invalid(path, str(exc)) from None
