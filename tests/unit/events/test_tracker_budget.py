"""A source over its ingest budget (events/budget.py) or its batch and replay limits goes stale
and recovers: the index is exact or stale, never silently partial. On `SourceTracker` alone,
injected clock."""

from __future__ import annotations

import logging

import pytest

from kvroute.core import DropReason, IngestLimits, ReplayOutcome
from kvroute.events import ReplayKind, ReplayRequest, SourceTracker, VllmBlockRemoved
from kvroute.events.budget import IngestBudget
from tests.unit.events.test_tracker import TIMINGS, Engine, Rig


def _rig(limits: IngestLimits) -> Rig:
    rig = Rig()
    budget = IngestBudget(limits, rig.clock)
    rig.tracker = SourceTracker(
        rig.tracker.spec, rig.index, rig.counters, TIMINGS, rig.clock, budget=budget
    )
    return rig


def test_a_source_over_its_byte_budget_goes_stale_then_catches_up_by_replay() -> None:
    engine = Engine()
    size = len(engine.batch()[1])  # every batch of this engine has the same size
    engine.sent.clear()
    rig = _rig(IngestLimits(source_bytes_per_s=10 * size, burst_s=1.0))
    rig.attach(engine)  # nothing to replay yet
    for _ in range(11):  # 10 in the burst, the 11th is admitted too (the bucket was not in debt)
        assert rig.live(engine, engine.batch()) is None
    assert not rig.tracker.stale and rig.held() == engine.reference()
    refused = [engine.batch() for _ in range(5)]  # a flood: refused before decoding
    for item in refused:
        assert rig.live(engine, item) is None
    assert rig.tracker.stale and rig.tracker.stale_reason() == "over_budget"
    rig.assert_single_owner()
    assert rig.dropped(DropReason.OVER_BUDGET) == 5
    assert rig.tracker.last == 10
    # Nothing happens before the bucket is out of debt, however often the timer fires.
    deadline = rig.tracker.next_deadline()
    assert deadline is not None and deadline >= rig.clock.t + 0.1 - 1e-9
    rig.clock.t = deadline
    request = rig.tracker.tick()
    assert request == ReplayRequest(11, ReplayKind.RETRY)
    rig.serve(request, engine)
    assert not rig.tracker.stale and rig.tracker.last == 15
    assert rig.held() == engine.reference()
    rig.assert_single_owner()


def test_events_charged_after_decoding_hold_the_next_batch_back() -> None:
    rig, engine = _rig(IngestLimits(source_events_per_s=2.0, burst_s=1.0)), Engine()
    rig.attach(engine)
    assert rig.live(engine, engine.batch()) is None  # 1 event: 1 of 2 left
    assert rig.live(engine, engine.batch()) is None  # 0 left
    assert rig.live(engine, engine.batch()) is None  # admitted at 0, now 1 in debt
    assert not rig.tracker.stale
    assert rig.live(engine, engine.batch()) is None
    assert rig.tracker.stale and rig.dropped(DropReason.OVER_BUDGET) == 1
    rig.clock.t += 10.0
    rig.serve(rig.tracker.tick(), engine)
    assert not rig.tracker.stale and rig.held() == engine.reference()


def test_a_throttled_sources_catch_up_is_charged_and_stops_where_the_budget_runs_out() -> None:
    rig, engine = _rig(IngestLimits(source_events_per_s=3.0, burst_s=1.0)), Engine()
    rig.attach(engine)
    for _ in range(10):  # 4 admitted (the 4th into debt), then refused: over budget
        rig.live(engine, engine.batch())
    assert rig.tracker.stale and rig.tracker.stale_reason() == "over_budget"
    deadline = rig.tracker.next_deadline()
    assert deadline is not None
    rig.clock.t = deadline
    rig.serve(rig.tracker.tick(), engine)  # the retry applies what the budget allows, no more
    assert rig.tracker.stale and rig.tracker.stale_reason() == "replay_over_budget"
    assert rig.replays(ReplayOutcome.OVER_BUDGET) == 1
    rig.assert_single_owner()
    for _ in range(10):  # each retry gets as far as the budget allows
        if not rig.tracker.stale:
            break
        deadline = rig.tracker.next_deadline()
        assert deadline is not None
        rig.clock.t = deadline
        rig.serve(rig.tracker.tick(), engine)
    assert not rig.tracker.stale and rig.tracker.last == len(engine.sent) - 1
    assert rig.held() == engine.reference()


def test_an_honest_sources_bootstrap_and_gap_repairs_are_not_charged() -> None:
    # A budget of 3 events/s, and 40 batches waiting in the engine's buffer: a restarted
    # gateway must not be stale for ten seconds while it catches up at the live rate.
    rig, engine = _rig(IngestLimits(source_events_per_s=3.0, burst_s=1.0)), Engine()
    for _ in range(40):
        engine.batch()
    rig.attach(engine)
    assert not rig.tracker.stale and rig.held() == engine.reference()
    request = rig.gap(engine)  # attach again is a no-op here: one live, one lost, one live
    rig.serve(request, engine)
    assert not rig.tracker.stale and rig.held() == engine.reference()
    assert rig.replays(ReplayOutcome.OVER_BUDGET) == 0


def test_a_flooding_source_spends_its_own_budget_not_the_honest_ones() -> None:
    limits = IngestLimits(source_events_per_s=10.0, total_events_per_s=1000.0, burst_s=1.0)
    flood, honest = _rig(limits), Rig()
    shared = IngestBudget(limits, flood.clock)
    flood.tracker = SourceTracker(
        flood.tracker.spec, flood.index, flood.counters, TIMINGS, flood.clock, budget=shared
    )
    honest.tracker = SourceTracker(
        honest.tracker.spec,
        honest.index,
        honest.counters,
        TIMINGS,
        flood.clock,
        budget=shared.for_source(),
    )
    bad, good = Engine(), Engine()
    flood.attach(bad)
    honest.attach(good)
    for _ in range(50):
        flood.live(bad, bad.batch())
    for _ in range(10):  # its own 10 events per second
        assert honest.live(good, good.batch()) is None
    assert flood.tracker.stale and flood.dropped(DropReason.OVER_BUDGET) == 39
    assert not honest.tracker.stale and honest.held() == good.reference()


def test_a_batch_with_too_many_blocks_is_refused_whole_and_the_source_is_stale() -> None:
    rig, engine = _rig(IngestLimits(max_batch_blocks=64, max_batch_events=8)), Engine()
    rig.attach(engine)
    assert rig.live(engine, engine.batch()) is None
    before = rig.held()
    # 100 block hashes in one BlockRemoved: more than the payload floor (64 bytes) and the limit.
    big = VllmBlockRemoved(block_hashes=list(range(10_000, 10_100)), medium="GPU")
    assert rig.live(engine, engine.batch([big])) is None
    assert rig.dropped(DropReason.TOO_LARGE) == 1 and rig.held() == before
    assert rig.tracker.stale and rig.tracker.stale_reason() == "malformed"
    rig.assert_single_owner()
    # Many small events: over max_batch_events.
    many = [VllmBlockRemoved(block_hashes=[h], medium="GPU") for h in range(20, 40)]
    assert rig.live(engine, engine.batch(many)) is None
    assert rig.dropped(DropReason.TOO_LARGE) == 1 + 20
    # The engine clears its cache: a fresh base, exact again.
    rig.live(engine, engine.clear())
    assert rig.live(engine, engine.batch()) is None
    assert not rig.tracker.stale and rig.held() == engine.reference()


def test_a_replay_cut_at_its_limit_ends_like_a_timeout_and_the_rest_is_asked_for_again() -> None:
    rig, engine = Rig(), Engine()
    rig.attach(engine)
    rig.live(engine, engine.batch())
    lost = [engine.batch() for _ in range(3)]
    request = rig.live(engine, engine.batch())
    assert request == ReplayRequest(lost[0][0], ReplayKind.GAP)
    # The reply is cut after its first batch: the live batch that asked is still ahead.
    cut = engine.buffer(request.start)[:1]
    assert rig.tracker.on_replay(request, cut, complete=False, truncated=True) is None
    assert rig.replays(ReplayOutcome.TRUNCATED) == 1
    assert rig.tracker.stale and rig.tracker.stale_reason() == "replay_truncated"
    rig.assert_single_owner()
    deadline = rig.tracker.next_deadline()
    assert deadline is not None
    rig.clock.t = deadline
    rig.serve(rig.tracker.tick(), engine)
    assert not rig.tracker.stale and rig.held() == engine.reference()


def test_refusals_are_logged_once_a_minute_per_source_and_kind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="kvroute.events.tracker")
    rig, engine = _rig(IngestLimits(source_events_per_s=1.0, burst_s=1.0)), Engine()
    rig.attach(engine)
    for _ in range(50):
        rig.live(engine, engine.batch())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "e/0 is over its ingest budget" in lines[0], lines
    assert rig.dropped(DropReason.OVER_BUDGET) == 48  # counted in full
    rig.clock.t += 61.0
    rig.live(engine, engine.batch())  # a retry is due too, but the budget is in debt again
    for _ in range(60):
        rig.live(engine, engine.batch())
    assert len(caplog.records) == 2
