"""least_loaded, round_robin and random: the load-only baselines."""

from __future__ import annotations

from collections import Counter

from kvroute.core import MatchResult
from kvroute.routing import Candidate, LeastLoadedPolicy, RandomPolicy, RoundRobinPolicy


def test_least_loaded_takes_fewest_outstanding_tokens_then_fewest_in_flight() -> None:
    candidates = [
        Candidate("a", True, 500, 1),
        Candidate("b", True, 100, 5),
        Candidate("c", True, 100, 2),
    ]
    decision = LeastLoadedPolicy().choose(candidates, {}, 10)
    assert decision.engine == "c"
    assert decision.ranked == ["c", "b", "a"]
    assert [s.cost for s in decision.scores] == [500.0, 100.0, 100.0]


def test_least_loaded_ignores_prefix_matches() -> None:
    match = MatchResult(blocks=9, tokens=144, by_medium={"GPU": 9}, block_size=16)
    candidates = [Candidate("a", True, 10, 1), Candidate("b", True, 0, 0)]
    assert LeastLoadedPolicy().choose(candidates, {"a": match}, 144).engine == "b"


def test_round_robin_cycles_through_healthy_engines_in_name_order() -> None:
    policy = RoundRobinPolicy()
    candidates = [Candidate(n, n != "b", 0, 0) for n in ("c", "a", "b", "d")]
    picks = [policy.choose(candidates, {}, 0).engine for _ in range(6)]
    assert picks == ["a", "c", "d", "a", "c", "d"]
    decision = policy.choose(candidates, {}, 0)
    assert decision.ranked == ["a", "c", "d"]
    assert all(s.cost is None for s in decision.scores)


def test_random_is_roughly_uniform_and_seeded() -> None:
    candidates = [Candidate(n, True, 0, 0) for n in ("a", "b", "c", "d")]
    policy = RandomPolicy(seed=42)
    counts = Counter(policy.choose(candidates, {}, 0).engine for _ in range(4000))
    assert set(counts) == {"a", "b", "c", "d"}
    assert all(800 < n < 1200 for n in counts.values())
    again = RandomPolicy(seed=42)
    first = [again.choose(candidates, {}, 0).engine for _ in range(20)]
    other = RandomPolicy(seed=43)
    assert first != [other.choose(candidates, {}, 0).engine for _ in range(20)]
