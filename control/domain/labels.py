"""Whose word decides an agent's labels: the server's, never the agent's.

Labels choose which holds cover a laptop, so an agent that could name its own labels
could walk out of a pause (``org=finance`` reconnecting as ``org=marketing``). The
server's labels come from an operator: the inventory import, or the join token the
agent enrolled with. Only an agent that has neither is labelled by its first report
(trust on first use, the weaker mode of development set-ups); after that, what an
agent reports is kept to be shown next to the server's labels, and never obeyed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Label key -> (the server's value, the agent's claim); None where one has no such key.
Mismatch = dict[str, tuple[str | None, str | None]]


def label_mismatch(server: Mapping[str, str], reported: Mapping[str, str] | None) -> Mismatch:
    """Where the agent's report contradicts the server, key by key.

    Only keys the agent reports count: an inventory may well know more about a laptop
    (its owner, its cost centre) than the laptop says of itself, and that is no claim.
    An agent that has not reported yet contradicts nothing.
    """
    if not reported:
        return {}
    return {
        key: (server.get(key), value)
        for key, value in sorted(reported.items())
        if server.get(key) != value
    }


def mismatch_json(
    server: Mapping[str, str], reported: Mapping[str, str] | None
) -> dict[str, dict[str, str | None]]:
    """The ``label_mismatch`` field of ``agents --json`` and the dashboard's rows."""
    return {
        key: {"server": server_value, "reported": reported_value}
        for key, (server_value, reported_value) in label_mismatch(server, reported).items()
    }


def describe_mismatch(mismatch: Mismatch) -> str:
    """``org: server finance, reported marketing`` for logs, audit and tables."""
    return "; ".join(
        f"{key}: server {server or '(none)'}, reported {reported or '(none)'}"
        for key, (server, reported) in mismatch.items()
    )


def describe_change(old: Mapping[str, str], new: Mapping[str, str]) -> str:
    """``org: finance -> marketing, +site=berlin, -ring`` for the audit of a relabel."""
    parts = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if before is None:
            parts.append(f"+{key}={after}")
        elif after is None:
            parts.append(f"-{key}")
        else:
            parts.append(f"{key}: {before} -> {after}")
    return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class LabelReport:
    """What a connect's report means for an agent the server already labels."""

    mismatch: Mismatch
    # The mismatch is new or different from the one the previous report showed: worth
    # one audit entry (a reconnect repeating the same claim is not).
    changed: bool


def judge_report(
    server: Mapping[str, str],
    previous: Mapping[str, str] | None,
    reported: Mapping[str, str],
) -> LabelReport:
    """Compare a fresh report with the server's labels and with the report before it."""
    mismatch = label_mismatch(server, reported)
    return LabelReport(mismatch, mismatch != label_mismatch(server, previous))
