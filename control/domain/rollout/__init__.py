"""Runbooks: gradual, gated re-enable of capture, as data and pure decisions.

A run keeps a *rollout hold* over the scope it re-enables and widens that hold's
release one wave at a time (Argo Rollouts' ``setWeight`` steps, applied to a
permission rather than a workload). Each tick the runner hands ``decide`` what the
control plane observes; ``decide`` answers what to do next. Everything here is a
function of its inputs, so a restarted server, or a test, reaches the same verdict
from the same stored progress.

Its parts, each a module here:

- ``runbook``: a runbook as data (waves, gates, a drill's pause) and which laptops
  each wave re-enables;
- ``run``: a run's durable progress and the steps that move it;
- ``observe``: the plane's verdicts counted for a wave's gates, or for a drill's pause;
- ``gates``: gates judged against an observation;
- ``decide``: one tick's verdict for a running wave or a drill's pause;
- ``plan``: a dry run over the fleet now.
"""

from control.domain.rollout.decide import DEFAULT_TICK_SECONDS
from control.domain.rollout.decide import Action
from control.domain.rollout.decide import Decision
from control.domain.rollout.decide import decide_pause
from control.domain.rollout.decide import decide_wave
from control.domain.rollout.decide import halting_hold
from control.domain.rollout.gates import breached
from control.domain.rollout.gates import capturing_share
from control.domain.rollout.gates import describe_failures
from control.domain.rollout.gates import evaluate_gates
from control.domain.rollout.observe import AgentVerdict
from control.domain.rollout.observe import Observation
from control.domain.rollout.observe import PauseObservation
from control.domain.rollout.observe import PrometheusReading
from control.domain.rollout.observe import observe_pause
from control.domain.rollout.observe import observe_wave
from control.domain.rollout.plan import WavePlan
from control.domain.rollout.plan import plan_waves
from control.domain.rollout.run import ACTIVE_RUN_STATES
from control.domain.rollout.run import GateResult
from control.domain.rollout.run import Run
from control.domain.rollout.run import RunState
from control.domain.rollout.run import WaveProgress
from control.domain.rollout.run import WaveState
from control.domain.rollout.run import end_run
from control.domain.rollout.run import new_run
from control.domain.rollout.run import new_run_id
from control.domain.rollout.run import start_wave
from control.domain.rollout.runbook import DEFAULT_PAUSE_TIMEOUT_SECONDS
from control.domain.rollout.runbook import DEFAULT_SOAK_SECONDS
from control.domain.rollout.runbook import DEFAULT_WAVE_TIMEOUT_SECONDS
from control.domain.rollout.runbook import FROM_APPROVAL
from control.domain.rollout.runbook import Gates
from control.domain.rollout.runbook import OnFailure
from control.domain.rollout.runbook import PauseStep
from control.domain.rollout.runbook import PrometheusGate
from control.domain.rollout.runbook import Runbook
from control.domain.rollout.runbook import Wave
from control.domain.rollout.runbook import check_waves

__all__ = [
    "ACTIVE_RUN_STATES",
    "DEFAULT_PAUSE_TIMEOUT_SECONDS",
    "DEFAULT_SOAK_SECONDS",
    "DEFAULT_TICK_SECONDS",
    "DEFAULT_WAVE_TIMEOUT_SECONDS",
    "FROM_APPROVAL",
    "Action",
    "AgentVerdict",
    "Decision",
    "GateResult",
    "Gates",
    "Observation",
    "OnFailure",
    "PauseObservation",
    "PauseStep",
    "PrometheusGate",
    "PrometheusReading",
    "Run",
    "RunState",
    "Runbook",
    "Wave",
    "WavePlan",
    "WaveProgress",
    "WaveState",
    "breached",
    "capturing_share",
    "check_waves",
    "decide_pause",
    "decide_wave",
    "describe_failures",
    "end_run",
    "evaluate_gates",
    "halting_hold",
    "new_run",
    "new_run_id",
    "observe_pause",
    "observe_wave",
    "plan_waves",
    "start_wave",
]
