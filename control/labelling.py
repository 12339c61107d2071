"""The plane's side of server-decided labels (the rules are ``control.domain.labels``).

An agent's labels choose which holds cover it, so only operators set them: the
inventory import (authoritative: it relabels agents already known) and the join token
an agent enrolled with. An agent known from neither is labelled by its first report
(trust on first use: the development mode, ``serve --insecure`` and the simulator).
Every later report is kept beside the server's labels, shown, and audited when the
contradiction it makes appears or changes; it never moves a hold.

Operators' labels are shared state: the replica that takes an import (or enrols the
agent) writes them, with their audit entries, to the store, and every other replica
adopts them on its next re-read (``adopt_decided``), whichever replica serves the agent.
Otherwise a laptop served elsewhere would keep the holds of its old labels, and a
pause by selector could miss it.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol
from typing import TypeVar

import structlog

from control.domain import AgentStatus
from control.domain.audit import AuditRecord
from control.domain.labels import describe_change
from control.domain.labels import describe_mismatch
from control.domain.labels import judge_report
from control.domain.labels import label_mismatch
from control.store import DecidedLabels

log = structlog.get_logger("killswitch.labels")

# Who the audit log names for what the server itself observed (as in the plane).
OBSERVER_ACTOR = "control-plane"


@dataclass(slots=True)
class LabelImport:
    """What an import of operator labels did, agent by agent."""

    added: int = 0
    relabelled: int = 0
    unchanged: int = 0

    @property
    def known(self) -> int:
        return self.relabelled + self.unchanged

    def describe(self) -> str:
        return f"{self.added} added, {self.known} known, {self.relabelled} relabelled"


def _mismatch_record(agent_id: str, detail: str, at: float) -> AuditRecord:
    # What the server saw, not a request it carried out: never "ok".
    return AuditRecord(
        at,
        OBSERVER_ACTOR,
        "system",
        "agent.label_mismatch",
        target=agent_id,
        result="observed",
        detail=detail,
    )


def _mismatch_detail(server: Mapping[str, str], reported: Mapping[str, str] | None) -> str:
    mismatch = label_mismatch(server, reported)
    if not mismatch:
        return "the agent's reported labels agree with the server's again"
    return f"{describe_mismatch(mismatch)} (the server's labels decide its holds)"


def note_report(
    agent_id: str,
    server: Mapping[str, str],
    status: AgentStatus,
    reported: dict[str, str],
    at: float,
) -> list[AuditRecord]:
    """Keep what a connecting agent says of itself; one audit entry when the
    contradiction is new or different, none when a reconnect repeats it."""
    report = judge_report(server, status.reported_labels, reported)
    status.reported_labels = reported
    if not report.changed:
        return []
    if report.mismatch:
        log.warning(
            "agent_label_mismatch", agent_id=agent_id, mismatch=describe_mismatch(report.mismatch)
        )
    return [_mismatch_record(agent_id, _mismatch_detail(server, reported), at)]


def relabel_records(
    operator_record: Callable[..., AuditRecord],
    agent_id: str,
    old: Mapping[str, str],
    new: Mapping[str, str],
    status: AgentStatus,
) -> list[AuditRecord]:
    """The audit of an operator relabelling a known agent: what changed, and the
    agent's contradiction if that appears or changes with it."""
    relabel = operator_record("agent.relabel", target=agent_id, detail=describe_change(old, new))
    records = [relabel]
    reported = status.reported_labels
    if label_mismatch(old, reported) != label_mismatch(new, reported):
        records.append(_mismatch_record(agent_id, _mismatch_detail(new, reported), relabel.at))
    log.info("agent_relabelled", agent_id=agent_id, change=relabel.detail)
    return records


class Labelled(Protocol):
    labels: dict[str, str]


Entry = TypeVar("Entry", bound=Labelled)


def adopt_decided(entries: Mapping[str, Entry], decided: Iterable[DecidedLabels]) -> list[Entry]:
    """Take the labels operators decided (on this replica or another) for the agents
    this replica knows; returns those whose labels changed: their holds must be judged
    again. The audit was written with the decision. An agent not known here is left
    out: its row, once read, carries the decided labels (the store reads them over it).
    """
    changed = []
    for label in decided:
        entry = entries.get(label.agent_id)
        if entry is None or entry.labels == label.labels:
            continue
        log.info(
            "agent_labels_adopted",
            agent_id=label.agent_id,
            change=describe_change(entry.labels, label.labels),
            set_by=label.set_by,
            version=label.version,
        )
        entry.labels = dict(label.labels)
        changed.append(entry)
    return changed
