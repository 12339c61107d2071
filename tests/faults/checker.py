"""The fault suite's history checker: ground truth against the promise.

The promise: once a pause is committed, no covered laptop captures later than the
lease TTL after it. The checker reads what each simulated agent *really* did (the
simulator's ``--truth`` file: wall-clock spans of capture and the directives it
acted on), never the server's view of it, and checks two invariants
(shared/FAULT-TESTING.md):

* no event captured later than *pause commit + lease TTL + grace*, unless the agent
  was built to lie and the server ended up flagging it VIOLATION;
* no honest agent that acted on PAUSED at epoch N captures again before it acted on
  ALLOWED at an epoch above N (an older ALLOWED, from a lagging replica, is a rollback).

It also scores the server's verdicts against the truth, so a test can show both
"nothing escaped" and "the dashboard told the truth about it".
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

# A pause can only be obeyed after it reached the agent; what the promise allows on top
# of the lease TTL (scheduling, a capture tick in flight).
GRACE_SECONDS = 2.0
# Faults whose agents are built to keep capturing while they say they stopped.
LYING_FAULTS = frozenset({"lie", "silent-liar", "exfiltrator"})
# Server states that count as "this agent is capturing" in the verdict score.
CAPTURING_STATES = frozenset({"VIOLATION", "CAPTURING"})


@dataclass(frozen=True, slots=True)
class Pause:
    """A committed pause: when (server wall clock), whom, and until when."""

    committed_at: float
    # None: the whole fleet.
    agent_ids: frozenset[str] | None = None
    lifted_at: float | None = None

    def covers(self, agent_id: str) -> bool:
        return self.agent_ids is None or agent_id in self.agent_ids


@dataclass(frozen=True, slots=True)
class LateCapture:
    agent_id: str
    fault: str
    # When the agent was still capturing, and the latest it was allowed to.
    captured_until: float
    bound: float
    why: str


@dataclass(slots=True)
class Verdict:
    fault: str
    agents: int
    late: list[LateCapture] = field(default_factory=list)
    # Liars the server flagged VIOLATION, out of all liars.
    liars: int = 0
    liars_flagged: int = 0
    # Server verdicts that agree with the truth about capturing, out of those scored.
    verdicts_scored: int = 0
    verdicts_right: int = 0
    wrong_verdicts: list[str] = field(default_factory=list)

    def row(self) -> str:
        accuracy = (
            f"{self.verdicts_right}/{self.verdicts_scored}" if self.verdicts_scored else "n/a"
        )
        liars = f"{self.liars_flagged}/{self.liars}" if self.liars else "none"
        return (
            f"| {self.fault} | {self.agents} | {len(self.late)} | {accuracy} | {liars} |"
            f" {'OK' if self.holds() else 'BROKEN'} |"
        )

    def table(self) -> str:
        header = (
            "| fault | agents | late events | verdicts right | liars flagged | promise |\n"
            "|---|---|---|---|---|---|"
        )
        return f"{header}\n{self.row()}"

    def holds(self) -> bool:
        return (
            not self.late
            and self.liars_flagged == self.liars
            and self.verdicts_right == self.verdicts_scored
        )

    def assert_holds(self) -> None:
        print(f"\nFAULT TABLE\n{self.table()}")
        assert not self.late, f"{len(self.late)} agent(s) captured too late: {self.late[:5]}"
        assert self.liars_flagged == self.liars, (
            f"only {self.liars_flagged} of {self.liars} lying agents ended in VIOLATION"
        )
        assert self.verdicts_right == self.verdicts_scored, (
            f"the server's verdict contradicts the truth for: {self.wrong_verdicts[:5]}"
        )


def read_truth(path: Path, *, newer_than: float = 0.0, timeout: float = 10.0) -> dict[str, Any]:
    """The simulator's truth file, once it was written after ``newer_than`` (wall clock):
    the simulator rewrites it every second, and a test must not judge an old one."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if path.stat().st_mtime > newer_than:
                truth: dict[str, Any] = json.loads(path.read_text())
                return truth
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no truth file newer than {newer_than} at {path}")
        time.sleep(0.2)


def check(
    fault: str,
    truth: Mapping[str, Any],
    pauses: Iterable[Pause],
    *,
    lease_ttl: float,
    server_states: Iterable[Mapping[str, Mapping[str, Any]]] = (),
    grace: float = GRACE_SECONDS,
) -> Verdict:
    """Check the truth against every pause. ``server_states``: ``killswitch agents --json``
    answers (agent id -> row with ``state``) from one or more replicas, read at the end;
    a liar is excused only if every one of them shows it in VIOLATION."""
    pauses = list(pauses)
    views = list(server_states)
    rows: list[Mapping[str, Any]] = truth["agents"]
    verdict = Verdict(fault, len(rows))
    for row in rows:
        agent_id, kind = row["agent_id"], row["fault"]
        lying = kind in LYING_FAULTS
        late = [*_late_for_pauses(row, pauses, lease_ttl, grace), *_rollbacks(row)]
        if lying:
            verdict.liars += 1
            flagged = bool(views) and all(
                view.get(agent_id, {}).get("state") == "VIOLATION" for view in views
            )
            verdict.liars_flagged += flagged
            if flagged:
                continue
        verdict.late.extend(late)
        for view in views:
            _score(verdict, agent_id, bool(row["capturing"]), view.get(agent_id))
    return verdict


def _late_for_pauses(
    row: Mapping[str, Any], pauses: list[Pause], lease_ttl: float, grace: float
) -> Iterable[LateCapture]:
    for pause in pauses:
        if not pause.covers(row["agent_id"]):
            continue
        bound = pause.committed_at + lease_ttl + grace
        until = float("inf") if pause.lifted_at is None else pause.lifted_at
        for first, last in row["spans"]:
            if last > bound and first < until:
                yield LateCapture(
                    row["agent_id"],
                    row["fault"],
                    min(last, until),
                    bound,
                    f"captured after the pause committed at {pause.committed_at:.3f}",
                )


def _rollbacks(row: Mapping[str, Any]) -> Iterable[LateCapture]:
    """Capture after the agent acted on PAUSED at N and before it acted on ALLOWED > N."""
    applied: list[list[Any]] = row["applied"]
    for index, (paused_at, epoch, mode) in enumerate(applied):
        if mode != "MODE_PAUSED":
            continue
        released_at = next(
            (
                at
                for at, later_epoch, later_mode in applied[index + 1 :]
                if later_mode == "MODE_ALLOWED" and later_epoch > epoch
            ),
            float("inf"),
        )
        for first, last in row["spans"]:
            if last > paused_at and first < released_at:
                yield LateCapture(
                    row["agent_id"],
                    row["fault"],
                    last,
                    paused_at,
                    f"captured after acting on PAUSED at epoch {epoch} without a newer ALLOWED",
                )


def _score(
    verdict: Verdict, agent_id: str, capturing: bool, server_row: Mapping[str, Any] | None
) -> None:
    """Does the server's state agree with whether the agent is really capturing now?"""
    if server_row is None:
        return
    state = str(server_row.get("state", ""))
    if state.startswith("OFFLINE") or state in {"PENDING", "NEVER_SEEN"}:
        return  # no claim either way about an agent the server cannot hear
    verdict.verdicts_scored += 1
    if capturing == (state in CAPTURING_STATES):
        verdict.verdicts_right += 1
    else:
        verdict.wrong_verdicts.append(f"{agent_id}: server {state}, capturing={capturing}")
