"""Which engines are evicting (routing/eviction.py), and kv_aware's queue weight while they are."""

from __future__ import annotations

import pytest

from kvroute.core import MatchResult
from kvroute.routing import Candidate, CostWeights, EvictionRecency, KvAwarePolicy


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
    weights = CostWeights(w_load=0.0, w_evict=0.0)
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


def test_defaults_drop_the_queue_weight_to_zero_while_all_evict() -> None:
    assert CostWeights().w_queue_evicting == 0.0
