"""The pure rollout core: wave membership, releases, gates and the run's decisions."""

from __future__ import annotations

import dataclasses

import pytest

from control.domain import ComplianceState
from control.domain import Hold
from control.domain import HoldKind
from control.domain import Mode
from control.domain import Scope
from control.domain import reconcile_desired
from control.domain.release import FULL_SHARE
from control.domain.release import Release
from control.domain.release import rank_key
from control.domain.rollout import Action
from control.domain.rollout import AgentVerdict
from control.domain.rollout import Gates
from control.domain.rollout import Observation
from control.domain.rollout import PauseStep
from control.domain.rollout import PrometheusGate
from control.domain.rollout import PrometheusReading
from control.domain.rollout import Run
from control.domain.rollout import Runbook
from control.domain.rollout import RunState
from control.domain.rollout import Wave
from control.domain.rollout import WaveState
from control.domain.rollout import decide_pause
from control.domain.rollout import decide_wave
from control.domain.rollout import end_run
from control.domain.rollout import evaluate_gates
from control.domain.rollout import halting_hold
from control.domain.rollout import new_run
from control.domain.rollout import observe_pause
from control.domain.rollout import observe_wave
from control.domain.rollout import plan_waves
from control.domain.rollout import start_wave
from control.errors import InvalidInput
from control.store.codec import release_from_json
from control.store.codec import release_to_json
from control.store.codec import run_from_json
from control.store.codec import run_to_json

STAGED = Runbook(
    name="staged",
    seed="seed-1",
    waves=tuple(
        Wave(f"{share // 100}%", share=share, soak=60.0, timeout=300.0)
        for share in (100, 500, 2500, 5000, FULL_SHARE)
    ),
)
IDS = [f"laptop-{i:05d}" for i in range(10_000)]
NO_LABELS: dict[str, str] = {}
CUTS = STAGED.cutoffs((a, NO_LABELS) for a in IDS)


def hold(hold_id: str = "hold-r", *, kind: HoldKind = HoldKind.ROLLOUT, **kw: object) -> Hold:
    fields: dict[str, object] = {
        "id": hold_id,
        "kind": kind,
        "scope": Scope.fleet(),
        "reason": "r",
        "ticket": "",
        "created_by": "ic-1",
        "created_at": 0.0,
        "created_epoch": 1,
    }
    fields.update(kw)
    return Hold(**fields)  # type: ignore[arg-type]


def test_rank_keys_are_stable_and_depend_on_the_seed() -> None:
    assert rank_key("s", "laptop-1") == rank_key("s", "laptop-1")
    assert rank_key("s", "laptop-1") != rank_key("t", "laptop-1")


def test_waves_are_exact_cumulative_and_never_reshuffle() -> None:
    waves = [STAGED.wave_of(a, {}, CUTS) for a in IDS]
    # Exactly 1%, 5%, 25%, 50% and 100% of 10,000, not a binomial draw around them.
    assert [waves.count(i) for i in range(5)] == [100, 400, 2000, 2500, 5000]
    for index in range(5):
        release = STAGED.release_through(index, CUTS[index])
        released = {a for a in IDS if release.releases(a, {})}
        assert released == {a for a, w in zip(IDS, waves, strict=True) if w <= index}
    # A laptop that joins later lands in the wave its key sorts into, labels aside.
    late = "laptop-late-joiner"
    assert STAGED.wave_of(late, {}, CUTS) == STAGED.wave_of(late, {"region": "eu"}, CUTS)


def test_a_one_percent_canary_on_fifty_laptops_takes_one_laptop() -> None:
    fleet = [(f"laptop-{i}", NO_LABELS) for i in range(50)]
    cuts = STAGED.cutoffs(fleet)
    waves = [STAGED.wave_of(a, {}, cuts) for a, _ in fleet]
    # ceil(1% x 50) = 1, ceil(5% x 50) = 3, ceil(25% x 50) = 13, 25, 50.
    assert [waves.count(i) for i in range(5)] == [1, 2, 10, 12, 25]


def test_selector_waves_release_whole_label_groups() -> None:
    book = Runbook(
        "ringed",
        "s",
        (Wave("canary", selector={"ring": "canary"}), Wave("rest", share=FULL_SHARE)),
    )
    cuts = book.cutoffs([("a", {"ring": "canary"}), ("b", {"ring": "general"})])
    assert book.wave_of("a", {"ring": "canary"}, cuts) == 0
    assert book.wave_of("a", {"ring": "general"}, cuts) == 1
    assert book.release_through(0, cuts[0]).releases("zzz", {"ring": "canary"})
    assert not book.release_through(0, cuts[0]).releases("zzz", {"ring": "general"})


@pytest.mark.parametrize(
    ("waves", "problem"),
    [
        ((), "at least one wave"),
        ((Wave("a", share=500), Wave("b", share=100)), "must grow"),
        ((Wave("a", share=500),), "last wave must re-enable 100%"),
        ((Wave("a", share=FULL_SHARE, soak=60, timeout=30),), "soak <= timeout"),
        ((Wave("a", share=FULL_SHARE, selector={"k": "v"}),), "exactly one of share or selector"),
        ((Wave("a", selector={"k": "v"}, min_agents=2), Wave("b", share=FULL_SHARE)), "share"),
        ((Wave("a", share=FULL_SHARE, min_agents=-1),), "0 or more"),
    ],
)
def test_invalid_waves_are_refused(waves: tuple[Wave, ...], problem: str) -> None:
    with pytest.raises(InvalidInput, match=problem):
        Runbook("bad", "s", waves)


def test_a_released_agent_is_allowed_unless_another_hold_covers_it() -> None:
    rollout = hold(release=STAGED.release_through(1, CUTS[1]))
    released = next(a for a in IDS if STAGED.wave_of(a, {}, CUTS) <= 1)
    still_held = next(a for a in IDS if STAGED.wave_of(a, {}, CUTS) > 1)
    opt_out = hold("hold-o", kind=HoldKind.OPT_OUT, scope=Scope.agents([released]))
    assert reconcile_desired(None, still_held, {}, [rollout], epoch=5, now=0).mode is Mode.PAUSED
    assert reconcile_desired(None, released, {}, [rollout], epoch=5, now=0).mode is Mode.ALLOWED
    desired = reconcile_desired(None, released, {}, [rollout, opt_out], epoch=5, now=0)
    assert desired.mode is Mode.PAUSED
    assert desired.hold_ids == ("hold-o",)


def verdicts(states: dict[str, ComplianceState], rollout: Hold) -> list[AgentVerdict]:
    out = []
    for agent_id, state in states.items():
        covering = (rollout.id,) if rollout.covers(agent_id, {}) else ()
        mode = Mode.PAUSED if covering else Mode.ALLOWED
        out.append(AgentVerdict(agent_id, {}, mode, covering, state))
    return out


def test_observing_a_wave_counts_only_its_own_agents() -> None:
    _, run = run_at_wave(1)
    rollout = hold(release=STAGED.release_through(1, CUTS[1]))
    wave0 = [a for a in IDS[:2000] if STAGED.wave_of(a, {}, CUTS) == 0]
    wave1 = [a for a in IDS[:2000] if STAGED.wave_of(a, {}, CUTS) == 1]
    later = [a for a in IDS[:2000] if STAGED.wave_of(a, {}, CUTS) > 1]
    states = dict.fromkeys(wave0, ComplianceState.CAPTURING)
    states |= dict.fromkeys(wave1, ComplianceState.RESUME_PENDING)
    states[wave1[0]] = ComplianceState.CAPTURING
    states[wave1[1]] = ComplianceState.OFFLINE
    states[wave0[0]] = ComplianceState.FAILED
    states |= dict.fromkeys(later, ComplianceState.VERIFIED_STOPPED)
    states[later[0]] = ComplianceState.VIOLATION
    obs = observe_wave(STAGED, run, rollout, 1, verdicts(states, rollout))
    assert obs.wave_agents == len(wave1)
    assert obs.wave_online == len(wave1) - 1
    assert obs.wave_capturing == 1
    assert obs.nacks == 1  # wave 0's FAILED agent counts: it was re-enabled by this run
    assert obs.violations == 1  # fleet-wide, even though that agent is still paused


def run_at_wave(index: int, started_at: float = 1000.0) -> tuple[Runbook, Run]:
    run = new_run(STAGED, file_name="f", source="s", started_by="ic-1", now=0.0, epoch=3)
    for i in range(index + 1):
        run = start_wave(run, i, now=started_at, cutoff=CUTS[i])
    return STAGED, run


def test_a_wave_waits_for_its_soak_then_passes() -> None:
    book, run = run_at_wave(0)
    good = Observation(wave_agents=10, wave_online=10, wave_capturing=10)
    early = decide_wave(book, run, good, now=1030.0)
    assert early.action is Action.WAIT
    assert early.run.wave(0).converged_at == 1030.0
    later = decide_wave(book, early.run, good, now=1061.0)
    assert later.action is Action.NEXT_WAVE
    assert later.run.wave(0).state is WaveState.PASSED
    assert later.run.wave(0).converged_at == 1030.0  # time to compliance: 30 s


def test_trouble_fails_at_once_and_slow_convergence_fails_at_the_timeout() -> None:
    book, run = run_at_wave(1)
    violation = Observation(wave_agents=10, wave_online=10, wave_capturing=10, violations=1)
    failed = decide_wave(book, run, violation, now=1001.0)
    assert failed.action is Action.FAIL
    assert "violations 1 (needs <= 0)" in failed.reason
    slow = Observation(wave_agents=10, wave_online=10, wave_capturing=5)
    assert decide_wave(book, run, slow, now=1200.0).action is Action.WAIT
    timed_out = decide_wave(book, run, slow, now=1301.0)
    assert timed_out.action is Action.FAIL
    assert "within 300s" in timed_out.reason


def test_last_wave_completes_and_confirmation_waves_wait_for_a_human() -> None:
    book, run = run_at_wave(4)
    good = Observation(wave_agents=1, wave_online=1, wave_capturing=1)
    assert decide_wave(book, run, good, now=2000.0).action is Action.COMPLETE
    confirming = dataclasses.replace(
        STAGED,
        waves=(
            STAGED.waves[0],
            dataclasses.replace(STAGED.waves[1], confirm=True),
            *STAGED.waves[2:],
        ),
    )
    _, run0 = run_at_wave(0)
    decision = decide_wave(confirming, run0, good, now=2000.0)
    assert decision.action is Action.AWAIT_CONFIRMATION
    assert decision.run.state is RunState.AWAITING_CONFIRMATION


def test_prometheus_gate_bounds_no_data_and_errors() -> None:
    gates = Gates(prometheus=PrometheusGate("q", source="main", max_value=0.5))
    obs = Observation(wave_online=1, wave_capturing=1)

    def result(reading: PrometheusReading) -> tuple[bool, str]:
        prom = evaluate_gates(gates, dataclasses.replace(obs, prometheus=reading))[-1]
        return prom.passed, prom.observed

    assert result(PrometheusReading(0.2)) == (True, "0.2")
    assert result(PrometheusReading(0.9)) == (False, "0.9")
    assert result(PrometheusReading()) == (False, "no data")
    assert result(PrometheusReading(error="refused"))[0] is False


def test_a_drill_pause_waits_for_verified_stop_everywhere() -> None:
    book = Runbook(
        "drill",
        "s",
        (Wave("canaries", share=FULL_SHARE, soak=1, timeout=10),),
        pause=PauseStep(Scope.selector({"ring": "canary"}), "drill", timeout=60),
    )
    run = dataclasses.replace(
        new_run(book, file_name="f", source="s", started_by="ic-1", now=0.0, epoch=1),
        hold_id="hold-p",
    )
    assert run.state is RunState.PAUSING
    pending = [
        AgentVerdict("a", {}, Mode.PAUSED, ("hold-p",), ComplianceState.VERIFIED_STOPPED),
        AgentVerdict("b", {}, Mode.PAUSED, ("hold-p",), ComplianceState.STOP_REPORTED),
        AgentVerdict("c", {}, Mode.ALLOWED, (), ComplianceState.CAPTURING),
    ]
    assert decide_pause(book, run, observe_pause("hold-p", pending), now=5).action is Action.WAIT
    done = [dataclasses.replace(v, state=ComplianceState.VERIFIED_STOPPED) for v in pending[:2]]
    verified = decide_pause(book, run, observe_pause("hold-p", done), now=7)
    assert verified.action is Action.AWAIT_APPROVAL
    assert verified.run.pause_verified_at == 7
    assert decide_pause(book, run, observe_pause("hold-p", pending), now=61).action is Action.FAIL


def test_only_a_newer_incident_hold_halts_a_run() -> None:
    _, run = run_at_wave(0)
    older = hold("hold-old", kind=HoldKind.INCIDENT, created_epoch=2)
    opt_out = hold("hold-o", kind=HoldKind.OPT_OUT, created_epoch=9)
    newer = hold("hold-new", kind=HoldKind.INCIDENT, created_epoch=9)
    assert halting_hold(run, [older, opt_out]) is None
    assert halting_hold(run, [older, opt_out, newer]) is newer


def test_runs_and_releases_survive_the_store_codec() -> None:
    _, run = run_at_wave(2)
    decided = decide_wave(
        STAGED,
        run,
        Observation(wave_agents=3, wave_online=3, wave_capturing=2),
        now=1010.0,
    ).run
    ended = end_run(decided, RunState.HALTED, now=1020.0, reason="why", repaused=True)
    assert run_from_json(run_to_json(ended)) == ended
    assert {w.state for w in ended.waves[:3]} == {WaveState.REPAUSED}
    release = Release("s", 500, ((("ring", "canary"),),), rank_key("s", "laptop-1"))
    assert release_from_json(release_to_json(release)) == release
    assert release_from_json(None) is None


def test_a_plan_lists_each_wave_and_agents_other_holds_keep_paused() -> None:
    no_labels: dict[str, str] = {}
    agents = [(a, no_labels, a == IDS[0]) for a in IDS[:1000]]
    plans = plan_waves(STAGED, Scope.fleet(), agents)
    assert sum(len(p.agent_ids) + len(p.held_back) for p in plans) == 1000
    cuts = STAGED.cutoffs((a, NO_LABELS) for a in IDS[:1000])
    assert IDS[0] in plans[STAGED.wave_of(IDS[0], {}, cuts)].held_back
    assert [len(p.agent_ids) + len(p.held_back) for p in plans] == [10, 40, 200, 250, 500]
    assert [p.starts_after for p in plans] == [0.0, 60.0, 120.0, 180.0, 240.0]
