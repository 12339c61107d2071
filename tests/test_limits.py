"""Token buckets, the refusal tally and the refusal log, on an injected clock."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from control.domain.audit import AuditRecord
from control.domain.limits import AGGREGATED_ACTION
from control.domain.limits import OTHER_REASONS
from control.domain.limits import OVERFLOW_SOURCE
from control.domain.limits import RefusalSource
from control.domain.limits import RefusalTally
from control.domain.limits import TokenBuckets
from control.errors import StoreUnavailable
from control.refusals import REFUSAL_BUDGET_BURST
from control.refusals import RefusalLog
from control.rpc.authz import peer_host
from tests.fake_clock import FakeClock


def test_a_bucket_spends_its_burst_then_refills_at_its_rate() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]
    assert buckets.take("b"), "each key has its own bucket"
    clock.now += 0.5  # one token back at two a second
    assert [buckets.take("a") for _ in range(2)] == [True, False]
    clock.now += 60  # never more than the burst
    assert sum(buckets.take("a") for _ in range(10)) == 3


def test_a_token_given_back_is_spent_again_but_never_above_the_burst() -> None:
    buckets = TokenBuckets(rate=1.0, burst=2, clock=FakeClock())
    assert buckets.take("a") and buckets.take("a") and not buckets.take("a")
    buckets.give_back("a")
    assert buckets.take("a") and not buckets.take("a")
    for _ in range(5):
        buckets.give_back("b")
    assert sum(buckets.take("b") for _ in range(5)) == 2


def test_many_sources_do_not_grow_the_buckets_without_bound() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(rate=1.0, burst=1, clock=clock, max_keys=3)
    for n in range(3):
        assert buckets.take(f"k{n}")
    clock.now += 5  # all refilled: forgetting them changes nothing
    assert buckets.take("k3")
    assert len(buckets._buckets) == 1
    for n in range(4, 7):
        assert buckets.take(f"k{n}")
    assert len(buckets._buckets) <= 3


def test_a_bucket_needs_a_rate_and_a_burst() -> None:
    with pytest.raises(ValueError):
        TokenBuckets(rate=0, burst=1, clock=FakeClock())
    with pytest.raises(ValueError):
        TokenBuckets(rate=1, burst=0, clock=FakeClock())


def test_the_tally_makes_one_record_per_source_whose_counts_add_up() -> None:
    tally = RefusalTally(max_sources=2, max_reasons=2)
    peer = RefusalSource("unauthenticated", "", "10.0.0.7")
    revoked = RefusalSource("laptop-1", "agent", "certificate 0a")
    for _ in range(5):
        tally.count(peer, "Enrollment.Enroll: unknown enrolment token")
    for reason in ["bad CSR", "rate limited", "rate limited", "expired"]:
        tally.count(peer, reason)
    tally.count(revoked, "AgentControl.Connect: certificate 0a has been revoked")
    tally.count(RefusalSource("unauthenticated", "", "10.0.0.8"), "no identity")
    assert tally.pending == 11
    records = {r.target: r for r in tally.drain(2_000.0)}
    assert tally.pending == 0 and tally.drain(2_001.0) == []
    assert set(records) == {"10.0.0.7", "certificate 0a", OVERFLOW_SOURCE}
    assert all(r.action == AGGREGATED_ACTION and r.at == 2_000.0 for r in records.values())
    assert records["10.0.0.7"].result == "denied: 9 calls"
    assert records["10.0.0.7"].detail == (
        f"5 x Enrollment.Enroll: unknown enrolment token; 3 x {OTHER_REASONS}; 1 x bad CSR"
    )
    assert (records["certificate 0a"].actor, records["certificate 0a"].role) == (
        "laptop-1",
        "agent",
    )
    assert records[OVERFLOW_SOURCE].result == "denied: 1 calls"


def test_the_refusal_log_audits_within_the_budget_and_aggregates_the_rest() -> None:
    clock = FakeClock()
    written: list[list[AuditRecord]] = []

    async def write(records: Sequence[AuditRecord]) -> None:
        written.append(list(records))

    async def scenario() -> None:
        refusals = RefusalLog(write, clock, interval=3600)
        record = AuditRecord(clock.now, "employee-1", "employee", "Operator.CreateHold")
        for _ in range(REFUSAL_BUDGET_BURST + 5):
            await refusals.refused(record, identity="serial-1")
        refusals.count(RefusalSource("unauthenticated", "", "10.0.0.7"), "bad token")
        assert len(written) == REFUSAL_BUDGET_BURST, "one write per refusal within budget"
        refusals.start()
        await refusals.stop()  # stopping writes what was counted

    asyncio.run(scenario())
    assert len(written) == REFUSAL_BUDGET_BURST + 1, "the aggregated entries in one write"
    results = sorted(r.result for r in written[-1])
    assert results == ["denied: 1 calls", "denied: 5 calls"]


def test_counts_the_store_refused_are_written_with_the_next_flush() -> None:
    clock = FakeClock()
    written: list[AuditRecord] = []
    failing = [True]

    async def write(records: Sequence[AuditRecord]) -> None:
        if failing[0]:
            raise StoreUnavailable("database down", cannot_write=False)
        written.extend(records)

    async def scenario() -> None:
        refusals = RefusalLog(write, clock)
        refusals.count(RefusalSource("unauthenticated", "", "a"), "bad token")
        with pytest.raises(StoreUnavailable):
            await refusals.flush()
        refusals.count(RefusalSource("unauthenticated", "", "a"), "bad token")
        failing[0] = False
        await refusals.flush()

    asyncio.run(scenario())
    assert [r.result for r in written] == ["denied: 1 calls", "denied: 1 calls"]


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.7:51234", "10.0.0.7"),
        ("ipv6:[::1]:51234", "::1"),
        ("unix:/tmp/sock", "unix:/tmp/sock"),
    ],
)
def test_the_source_of_a_call_is_its_address_without_the_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host
