"""Scopes: which laptops a hold covers, and the label/id syntax they accept."""

from __future__ import annotations

import re
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from enum import StrEnum

from control.errors import InvalidInput
from control.errors import shown

# Kubernetes-style label syntax: short, printable, no separators that would make
# `k=v,k=v` ambiguous.
_LABEL_KEY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
MAX_LABELS = 32


def validate_name(name: str, pattern: re.Pattern[str], *, what: str, allowed: str) -> str:
    """The one check for a name that becomes an id (an agent's, a certificate's), so every
    refusal tells the caller the rule in the same words: ``allowed`` is what may appear."""
    if not pattern.match(name):
        raise InvalidInput(
            f"invalid {what} {shown(name)}: use {allowed} starting with a letter or digit"
        )
    return name


def validate_agent_id(agent_id: str) -> str:
    return validate_name(
        agent_id, _AGENT_ID, what="agent id", allowed="1-128 letters, digits or . _ : @ -"
    )


def validate_labels(labels: Mapping[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidInput(f"too many labels ({len(labels)}); at most {MAX_LABELS}")
    for key, value in labels.items():
        if not _LABEL_KEY.match(key):
            raise InvalidInput(f"invalid label key {shown(key)}: use letters, digits and . _ / -")
        if not _LABEL_VALUE.match(value):
            raise InvalidInput(f"invalid value {shown(value)} for label {shown(key)}")
    return dict(labels)


def parse_label_pairs(pairs: Iterable[str], *, what: str = "label") -> dict[str, str]:
    """Parse ``k=v`` items; a repeated key with two values is an error, not a silent override."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise InvalidInput(f"bad {what} {shown(pair)}: expected k=v")
        if labels.get(key, value) != value:
            raise InvalidInput(f"bad {what}: {shown(key)} given twice with different values")
        labels[key] = value
    return validate_labels(labels)


def parse_selector(text: str) -> dict[str, str]:
    """Parse ``k=v[,k=v...]``; every pair must match (logical AND)."""
    if not text.strip():
        raise InvalidInput("bad selector '': expected k=v[,k=v...]")
    try:
        return parse_label_pairs(text.split(","), what="selector")
    except InvalidInput as exc:
        raise InvalidInput(f"{exc} in selector {shown(text)}") from None


def format_labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


class ScopeKind(StrEnum):
    """How a scope names its laptops, stored with the hold so a laptop that joins later
    is covered by a fleet or selector hold but never by a list of ids."""

    ALL = "all"
    SELECTOR = "selector"
    AGENTS = "agents"


@dataclass(frozen=True, slots=True)
class Scope:
    """The laptops a hold covers: the whole fleet, a label selector, or listed ids."""

    kind: ScopeKind
    match_labels: Mapping[str, str] = field(default_factory=dict)
    agent_ids: frozenset[str] = frozenset()

    @classmethod
    def fleet(cls) -> Scope:
        return cls(ScopeKind.ALL)

    @classmethod
    def selector(cls, match_labels: Mapping[str, str]) -> Scope:
        if not match_labels:
            raise InvalidInput("a selector scope needs at least one k=v pair")
        return cls(ScopeKind.SELECTOR, match_labels=validate_labels(match_labels))

    @classmethod
    def agents(cls, agent_ids: Iterable[str]) -> Scope:
        ids = frozenset(validate_agent_id(a) for a in agent_ids)
        if not ids:
            raise InvalidInput("an agent scope needs at least one agent id")
        return cls(ScopeKind.AGENTS, agent_ids=ids)

    def covers(self, agent_id: str, labels: Mapping[str, str]) -> bool:
        if self.kind is ScopeKind.ALL:
            return True
        if self.kind is ScopeKind.AGENTS:
            return agent_id in self.agent_ids
        return all(labels.get(k) == v for k, v in self.match_labels.items())

    def describe(self) -> str:
        if self.kind is ScopeKind.ALL:
            return "all agents"
        if self.kind is ScopeKind.SELECTOR:
            return format_labels(self.match_labels)
        ids = sorted(self.agent_ids)
        shown = ",".join(ids[:3])
        return f"agents {shown}" + (f" (+{len(ids) - 3} more)" if len(ids) > 3 else "")
