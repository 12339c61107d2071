"""Exact, never-empty, sticky waves: properties of ``Runbook.cutoffs`` over any fleet.

Share waves take a prefix of one ranking by hash, so these hold for every fleet and
every list of shares, not just for the fleets a unit test happens to pick.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from control.domain.release import FULL_SHARE
from control.domain.release import rank_key
from control.domain.rollout import Runbook
from control.domain.rollout import Wave
from control.domain.rollout import new_run
from control.domain.rollout import start_wave

NO_LABELS: dict[str, str] = {}


@st.composite
def books(draw: st.DrawFn) -> Runbook:
    """Share-only runbooks: growing shares ending at 100%, some with ``min_agents``."""
    shares = sorted(draw(st.sets(st.integers(1, FULL_SHARE - 1), max_size=5)))
    waves = [
        Wave(f"w{i}", share=share, min_agents=draw(st.integers(0, 4)))
        for i, share in enumerate([*shares, FULL_SHARE])
    ]
    return Runbook("prop", draw(st.text(min_size=1, max_size=8)), tuple(waves))


fleets = st.lists(st.text(min_size=1, max_size=12), unique=True, max_size=80)


def waves_of(book: Runbook, ids: Sequence[str]) -> dict[str, int]:
    cutoffs = book.cutoffs((a, NO_LABELS) for a in ids)
    return {a: book.wave_of(a, NO_LABELS, cutoffs) for a in ids}


def expected_cumulative(book: Runbook, fleet_size: int) -> list[int]:
    """ceil(share x N), raised so each wave takes max(1, min_agents) new, capped at N."""
    counts, previous = [], 0
    for wave in book.waves:
        share_count = -(-(wave.share or 0) * fleet_size // FULL_SHARE)
        previous = min(fleet_size, max(share_count, previous + max(1, wave.min_agents)))
        counts.append(previous)
    return counts


@given(books(), fleets)
def test_each_wave_takes_exactly_its_count(book: Runbook, ids: list[str]) -> None:
    waves = waves_of(book, ids)
    cumulative = [sum(w <= i for w in waves.values()) for i in range(len(book.waves))]
    assert cumulative == expected_cumulative(book, len(ids))


@given(books(), fleets)
def test_no_share_wave_is_empty_while_laptops_remain(book: Runbook, ids: list[str]) -> None:
    waves = list(waves_of(book, ids).values())
    remaining = len(ids)
    for index, wave in enumerate(book.waves):
        if remaining:
            assert waves.count(index) >= min(remaining, max(1, wave.min_agents))
        remaining -= waves.count(index)


@given(books(), fleets)
def test_waves_follow_the_ranking(book: Runbook, ids: list[str]) -> None:
    """A laptop ranked earlier is never in a later wave: every wave is a prefix."""
    waves = waves_of(book, ids)
    ranked = sorted(ids, key=lambda a: rank_key(book.seed, a))
    assert [waves[a] for a in ranked] == sorted(waves.values())


@given(
    books(),
    fleets,
    st.lists(st.text(min_size=1, max_size=12), max_size=4),
    st.data(),
)
def test_a_laptop_inside_its_wave_by_more_than_m_survives_m_changes(
    book: Runbook, ids: list[str], joiners: list[str], data: st.DataObject
) -> None:
    """The documented stickiness: each join or leave moves a laptop's margin by one at most.

    A laptop's margin in wave i is (laptops through wave i) - (its rank, from 0). After
    m laptops join or leave, a laptop whose margin was more than m is still in wave i or
    an earlier one.
    """
    leavers = data.draw(st.lists(st.sampled_from(ids), unique=True, max_size=4)) if ids else []
    joiners = [j for j in dict.fromkeys(joiners) if j not in ids]
    changed = [a for a in ids if a not in leavers] + joiners
    changes = len(leavers) + len(joiners)
    before, after = waves_of(book, ids), waves_of(book, changed)
    ranked = sorted(ids, key=lambda a: rank_key(book.seed, a))
    cumulative = expected_cumulative(book, len(ids))
    for rank, agent in enumerate(ranked):
        if agent in leavers:
            continue
        wave = before[agent]
        if cumulative[wave] - rank > changes:
            assert after[agent] <= wave


def test_a_started_wave_never_narrows_what_earlier_waves_released() -> None:
    """Within a run the cutoff only grows, whatever left the fleet between two waves."""
    book = Runbook("r", "s", (Wave("a", share=5000), Wave("b", share=FULL_SHARE)))
    run = new_run(book, file_name="f", source="s", started_by="ic-1", now=0.0, epoch=1)
    wide, narrow = sorted(rank_key("s", f"laptop-{i}") for i in range(2))[::-1]
    run = start_wave(run, 0, now=1.0, cutoff=wide)
    run = start_wave(run, 1, now=2.0, cutoff=narrow)
    assert run.cutoffs == (wide, wide)
