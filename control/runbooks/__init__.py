"""The runbook runner: APScheduler ticks each active run; the domain decides each step.

Level-triggered like a Kubernetes controller: every tick reads the run's stored
progress and the plane's current verdicts, asks ``control.domain.rollout`` what to
do, and commits the step together with its hold changes and audit entries. A
restarted server reloads the runs and carries on from the stored step, so a wave
is never enabled twice or skipped.

Its parts, each a module here:

- ``runner``: ``RunbookRunner``: scheduling the ticks, queries, and the commands
  (start, advance, abort);
- ``steps``: what moves a run: a tick's step and the transitions commands share
  (taking over an approved hold, the next wave, the end);
- ``ledger``: the runs known here, their parsed runbooks, and storing a step.
"""

from control.runbooks.runner import Plan
from control.runbooks.runner import RunbookRunner
from control.runbooks.runner import next_step
from control.runbooks.runner import runbook_sha256

__all__ = ["Plan", "RunbookRunner", "next_step", "runbook_sha256"]
