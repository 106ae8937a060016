"""Ingest budgets: token buckets per source and for the process, on an injected clock."""

from __future__ import annotations

import pytest

from kvroute.core import IngestLimits
from kvroute.events.budget import IngestBudget, TokenBucket


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_saves_up_its_burst_goes_into_debt_and_pays_it_off_at_its_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst_s=2.0, now=0.0)
    assert bucket.capacity == 20.0 and bucket.ready(0.0)
    bucket.charge(50.0, 0.0)  # charged after the work: 30 in debt
    assert not bucket.ready(0.0)
    assert bucket.ready_at(0.0) == pytest.approx(3.0)
    assert not bucket.ready(2.9)
    assert bucket.ready(3.0)
    assert bucket.ready(1000.0) and bucket.tokens == 20.0  # never more than the burst


def test_a_bucket_without_a_rate_never_limits() -> None:
    bucket = TokenBucket(rate=0.0, burst_s=2.0, now=0.0)
    bucket.charge(1e12, 0.0)
    assert bucket.ready(0.0) and bucket.ready_at(0.0) == 0.0


def test_no_limits_admit_everything_without_reading_the_clock_per_batch() -> None:
    reads = []

    def clock() -> float:
        reads.append(1)
        return 0.0

    budget = IngestBudget(IngestLimits(), clock)
    reads.clear()
    assert not budget.limited
    assert budget.admit(10**9)
    budget.charge_events(10**9)
    assert reads == []


def test_a_source_over_its_byte_budget_is_refused_until_the_rate_has_paid_it_off() -> None:
    clock = _Clock()
    budget = IngestBudget(IngestLimits(source_bytes_per_s=1000.0, burst_s=1.0), clock)
    assert budget.admit(600) and budget.admit(600)  # admitted while not in debt: -200 now
    assert not budget.admit(1)
    assert budget.ready_at() == pytest.approx(100.2)
    clock.now = 100.2
    assert budget.admit(1)


def test_events_are_charged_after_decoding_and_hold_the_next_batches_back() -> None:
    clock = _Clock()
    budget = IngestBudget(IngestLimits(source_events_per_s=100.0, burst_s=1.0), clock)
    assert budget.admit(10)
    budget.charge_events(300)
    assert not budget.admit(10)
    clock.now += 2.0
    assert budget.admit(10)


def test_the_process_budget_is_shared_and_one_source_cannot_spend_another_sources_own() -> None:
    clock = _Clock()
    limits = IngestLimits(source_events_per_s=100.0, total_events_per_s=150.0, burst_s=1.0)
    first = IngestBudget(limits, clock)
    flood, honest = first.for_source(), first.for_source()
    assert flood.admit(1)
    flood.charge_events(120)  # over its own 100: only the flood waits
    assert not flood.admit(1)
    assert honest.admit(1)
    honest.charge_events(40)  # the process total is now 160 of 150: everyone waits
    assert not honest.admit(1) and not first.admit(1)
    clock.now += 0.1  # 15 back in the total; the flood's own bucket still owes 5
    assert honest.admit(1) and not flood.admit(1)
