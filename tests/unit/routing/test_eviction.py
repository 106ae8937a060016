"""Which engines are evicting (routing/eviction.py), and kv_aware's queue weight while they are."""

from __future__ import annotations

import pytest

from kvroute.core import MatchResult
from kvroute.routing import Candidate, CostWeights, EvictionRecency, KvAwarePolicy
from kvroute.routing.kv_aware import saturated


def test_an_engine_evicts_from_a_rise_of_its_count_until_the_window_passes() -> None:
    seen = EvictionRecency(window_s=10.0)
    seen.update({"a": 5, "b": 0}, now=100.0)
    assert not seen.evicting("a", 100.0)  # a first count is a baseline, not an eviction
    seen.update({"a": 5, "b": 3}, now=101.0)
    assert seen.evicting("b", 101.0) and not seen.evicting("a", 101.0)
    assert seen.evicting("b", 111.0) and not seen.evicting("b", 111.5)
    seen.update({"b": 1}, now=112.0)  # a source went away: lower, not a rise
    assert not seen.evicting("b", 112.0)
    seen.update({"b": 2}, now=113.0)
    assert seen.evicting("b", 113.0)
    assert not seen.evicting("never-seen", 113.0)


def test_the_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window_s"):
        EvictionRecency(window_s=0.0)


def _match(blocks: int) -> MatchResult:
    return MatchResult(blocks=blocks, tokens=blocks * 16, by_medium={"GPU": blocks}, block_size=16)


def test_while_every_engine_evicts_the_queue_no_longer_moves_a_prefix() -> None:
    # "hot" holds 1,600 of a 2,000-token prompt behind 3,000 queued tokens: with the queue
    # weighed it goes to the idle "cold"; while both pools evict, the prefix decides.
    weights = CostWeights(w_load=0.0, w_evict=0.0)  # the queue weight alone
    matches = {"hot": _match(100)}

    def pick(evicting: bool) -> str:
        candidates = [
            Candidate("hot", True, 0, 3, queued_prefill_tokens=3000, evicting=evicting),
            Candidate("cold", True, 0, 0, evicting=evicting),
        ]
        return KvAwarePolicy(weights=weights).choose(candidates, matches, 2000).engine

    assert pick(evicting=False) == "cold"
    assert pick(evicting=True) == "hot"
    # w_queue_evicting = w_queue: the signal changes nothing
    same = CostWeights(w_load=0.0, w_evict=0.0, w_queue_evicting=1.0)
    candidates = [
        Candidate("hot", True, 0, 3, queued_prefill_tokens=3000, evicting=True),
        Candidate("cold", True, 0, 0, evicting=True),
    ]
    assert KvAwarePolicy(weights=same).choose(candidates, matches, 2000).engine == "cold"


def test_the_queue_weight_blends_by_the_evicting_share_of_healthy_engines() -> None:
    weights = CostWeights(w_load=0.0, w_evict=0.0, w_queue_evicting=0.0)
    matches = {"hot": _match(100)}
    # One of two evicting: w_queue 0.5, so 3,000 queued count 1,500 against 1,600 saved.
    candidates = [
        Candidate("hot", True, 0, 3, queued_prefill_tokens=3000, evicting=True),
        Candidate("cold", True, 0, 0),
    ]
    decision = KvAwarePolicy(weights=weights).choose(candidates, matches, 2000)
    costs = {s.name: s.cost for s in decision.scores}
    assert costs == {"hot": pytest.approx(400 + 1500), "cold": pytest.approx(2000)}
    assert decision.engine == "hot"
    # an unhealthy evicting engine does not count toward the share
    sick = [*candidates, Candidate("sick", False, 0, 0, evicting=True)]
    scores = KvAwarePolicy(weights=weights).choose(sick, matches, 2000).scores
    assert {s.name: s.cost for s in scores}["hot"] == pytest.approx(400 + 1500)


def test_defaults_nearly_drop_the_queue_weight_while_all_evict_or_the_fleet_is_saturated() -> None:
    assert CostWeights().w_queue_evicting == 0.1
    assert CostWeights().saturated_queue_ratio == 0.5


def test_a_saturated_fleet_keeps_a_prefix_where_it_lives() -> None:
    # Every engine has at least half the prompt queued: moving the prompt off its prefix buys
    # no idle engine, so the queue weight drops to w_queue_evicting, as if every pool evicted.
    weights = CostWeights(w_load=0.0, w_evict=0.0, w_queue_evicting=0.0)
    matches = {"hot": _match(100)}

    def pick(cold_queue: float) -> str:
        candidates = [
            Candidate("hot", True, 0, 3, queued_prefill_tokens=3000),
            Candidate("cold", True, 0, 1, queued_prefill_tokens=cold_queue),
        ]
        decision = KvAwarePolicy(weights=weights).choose(candidates, matches, 2000)
        # /v1/route shows the weight the queue got
        assert decision.queue_weight == (0.0 if cold_queue >= 1000 else 1.0)
        return decision.engine

    assert pick(cold_queue=0) == "cold"  # an idle engine: the queue is weighed
    assert pick(cold_queue=999) == "cold"  # just under half of 2,000 tokens queued there
    assert pick(cold_queue=1000) == "hot"  # saturated
    # ratio 0 turns the rule off; an unhealthy idle engine does not make the fleet unsaturated
    off = CostWeights(w_load=0.0, w_evict=0.0, w_queue_evicting=0.0, saturated_queue_ratio=0.0)
    busy = [
        Candidate("hot", True, 0, 3, queued_prefill_tokens=3000),
        Candidate("cold", True, 0, 1, queued_prefill_tokens=1000),
    ]
    assert KvAwarePolicy(weights=off).choose(busy, matches, 2000).engine == "cold"
    sick = [*busy, Candidate("sick", False, 0, 0)]
    assert KvAwarePolicy(weights=weights).choose(sick, matches, 2000).engine == "hot"


def test_saturated_needs_every_healthy_engine_queued() -> None:
    busy = [Candidate("a", True, 0, 1, queued_prefill_tokens=600.0)]
    assert saturated(busy, 1000, 0.5)
    assert not saturated([*busy, Candidate("b", True, 0, 0)], 1000, 0.5)
    assert not saturated(busy, 1000, 0.0)  # off
    assert not saturated([], 1000, 0.5)
    assert not saturated(busy, 0, 0.5)  # an empty prompt waits for nothing
