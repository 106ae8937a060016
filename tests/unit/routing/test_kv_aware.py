"""kv_aware: the cost of docs/design.md §6, speculative blocks, queued prefill, ties, the cap."""

from __future__ import annotations

import pytest

from kvroute.core import MatchResult
from kvroute.routing import (
    GUARD_POLICY_NAME,
    Candidate,
    CostWeights,
    KvAwarePolicy,
    evicted_tokens,
    kv_cost,
)

# Unit weights make the arithmetic below readable; the defaults are pinned separately.
W = CostWeights(w_load=1.0)


def _match(
    gpu: int = 0, cpu: int = 0, other: int = 0, spec: int = 0, size: int = 16
) -> MatchResult:
    by_medium = {k: v for k, v in {"GPU": gpu, "CPU": cpu, "DISK": other}.items() if v}
    blocks = gpu + cpu + other
    return MatchResult(
        blocks=blocks,
        tokens=blocks * size,
        by_medium=by_medium,
        speculative_blocks=spec,
        block_size=size,
    )


def test_cost_without_match_is_prompt_plus_load() -> None:
    assert kv_cost(None, 50, 1000, W) == 1050.0
    assert kv_cost(MatchResult(), 0, 1000, W) == 1000.0


def test_cost_weights_media_gpu_1_cpu_0_8_other_0_5() -> None:
    assert kv_cost(_match(gpu=10), 0, 1000, W) == pytest.approx(1000 - 160)
    assert kv_cost(_match(cpu=10), 0, 1000, W) == pytest.approx(1000 - 0.8 * 160)
    assert kv_cost(_match(other=10), 0, 1000, W) == pytest.approx(1000 - 0.5 * 160)
    assert kv_cost(_match(gpu=5, cpu=5), 0, 1000, W) == pytest.approx(1000 - 80 - 0.8 * 80)


def test_cost_uses_w_prefill_and_w_load() -> None:
    weights = CostWeights(w_prefill=2.0, w_load=0.5)
    assert kv_cost(_match(gpu=1), 100, 64, weights) == pytest.approx(2.0 * 48 + 0.5 * 100)


def test_speculative_blocks_count_as_gpu_only_beyond_confirmed() -> None:
    # confirmed 4 GPU blocks, speculative 6: 6 blocks saved, not 10
    assert kv_cost(_match(gpu=4, spec=6), 0, 1000, W) == pytest.approx(1000 - 96)
    # speculative shorter than confirmed adds nothing
    assert kv_cost(_match(gpu=4, spec=2), 0, 1000, W) == pytest.approx(1000 - 64)
    # confirmed CPU blocks stay CPU-weighted; only the extra speculative ones are GPU
    assert kv_cost(_match(cpu=4, spec=6), 0, 1000, W) == pytest.approx(1000 - 0.8 * 64 - 32)
    # speculative alone
    assert kv_cost(_match(spec=3), 0, 1000, W) == pytest.approx(1000 - 48)


def test_a_fully_cached_prompt_still_prefills_its_last_block() -> None:
    # 160 tokens = 10 full blocks, all cached: vLLM reuses at most 159 tokens, i.e. 9 blocks
    assert kv_cost(_match(gpu=10), 0, 160, W) == pytest.approx(160 - 144)
    # 161 tokens: all 10 blocks are usable
    assert kv_cost(_match(gpu=10), 0, 161, W) == pytest.approx(161 - 160)
    # the cap cuts speculative blocks beyond the confirmed prefix first
    assert kv_cost(_match(gpu=8, spec=10), 0, 160, W) == pytest.approx(160 - 144)
    # then the cheapest confirmed blocks: 9 usable of 6 GPU + 4 CPU -> 6 GPU + 3 CPU
    assert kv_cost(_match(gpu=6, cpu=4), 0, 160, W) == pytest.approx(160 - 96 - 0.8 * 48)


def test_cost_never_saves_more_than_the_prompt() -> None:
    assert kv_cost(_match(gpu=10), 5, 100, W) == pytest.approx(100 - 96 + 5)
    assert kv_cost(_match(gpu=10), 0, 0, W) == 0.0
    assert kv_cost(_match(gpu=10), 0, 1, W) == 1.0


def test_engines_holding_all_usable_blocks_tie_and_load_decides() -> None:
    # a holds all 10 blocks of a 160-token prompt, b holds 9: both reuse 144 tokens
    candidates = [Candidate("a", True, 50, 1), Candidate("b", True, 0, 0)]
    decision = KvAwarePolicy().choose(candidates, {"a": _match(gpu=10), "b": _match(gpu=9)}, 160)
    assert decision.engine == "b"


def test_blocks_without_a_medium_count_as_gpu() -> None:
    m = MatchResult(blocks=3, tokens=48, by_medium={}, block_size=16)
    assert kv_cost(m, 0, 100, W) == pytest.approx(52)


def test_prefers_longest_prefix() -> None:
    policy = KvAwarePolicy()
    candidates = [Candidate(n, True, 0, 0) for n in ("a", "b", "c")]
    matches = {"a": _match(gpu=2), "b": _match(gpu=8), "c": _match(gpu=5)}
    decision = policy.choose(candidates, matches, 200)
    assert decision.engine == "b"
    assert decision.ranked == ["b", "c", "a"]
    assert [s.cost for s in decision.scores] == [168.0, 72.0, 120.0]


def test_gpu_prefix_beats_equal_cpu_prefix() -> None:
    candidates = [Candidate("cpu", True, 0, 0), Candidate("gpu", True, 0, 0)]
    matches = {"cpu": _match(cpu=8), "gpu": _match(gpu=8)}
    assert KvAwarePolicy().choose(candidates, matches, 200).engine == "gpu"


def test_load_outweighs_a_short_prefix() -> None:
    # a holds 32 tokens but has 500 outstanding; b holds nothing and is idle
    candidates = [Candidate("a", True, 500, 2), Candidate("b", True, 0, 0)]
    decision = KvAwarePolicy().choose(candidates, {"a": _match(gpu=2)}, 200)
    assert decision.engine == "b"
    assert decision.policy == "kv_aware"


def test_long_prefix_outweighs_moderate_load() -> None:
    candidates = [Candidate("a", True, 500, 2), Candidate("b", True, 0, 0)]
    decision = KvAwarePolicy().choose(candidates, {"a": _match(gpu=100)}, 2000)
    assert decision.engine == "a"


def test_speculative_prefix_keeps_a_burst_together() -> None:
    # a request just went to "a" (not yet confirmed by events) and "a" now has a little load
    candidates = [Candidate("a", True, 300, 1), Candidate("b", True, 0, 0)]
    decision = KvAwarePolicy().choose(candidates, {"a": _match(spec=60)}, 1000)
    assert decision.engine == "a"


def test_ties_are_broken_by_seeded_random_choice() -> None:
    candidates = [Candidate(n, True, 0, 0) for n in ("a", "b", "c")]
    matches = {"a": _match(gpu=4), "b": _match(gpu=4)}
    picks = [KvAwarePolicy(seed=s).choose(candidates, matches, 100).engine for s in range(40)]
    assert set(picks) == {"a", "b"}  # both tied engines, never the worse one
    again = [KvAwarePolicy(seed=s).choose(candidates, matches, 100).engine for s in range(40)]
    assert picks == again


def test_ranked_lists_tied_engines_before_worse_ones() -> None:
    candidates = [Candidate(n, True, 0, 0) for n in ("a", "b", "c")]
    decision = KvAwarePolicy(seed=1).choose(
        candidates, {"a": _match(gpu=4), "b": _match(gpu=4)}, 100
    )
    assert set(decision.ranked[:2]) == {"a", "b"}
    assert decision.ranked[2] == "c"


def test_queued_prefill_counts_like_own_prefill() -> None:
    # 1000-token prompt, 10 cached blocks (160 tokens) and 300 tokens queued for prefill
    assert kv_cost(_match(gpu=10), 0, 1000, W, 300.0) == pytest.approx(840 + 300)
    assert kv_cost(None, 0, 1000, CostWeights(w_load=0.0, w_queue=0.5), 300.0) == 1150.0
    assert kv_cost(None, 0, 1000, W, -5.0) == 1000.0  # a negative queue counts as none


def test_a_queue_longer_than_the_prefix_spills_to_a_second_engine() -> None:
    # "hot" holds 4,096 of a 4,300-token prompt; prefilling it again costs "cold" 4,300 tokens
    weights = CostWeights(w_load=0.0)
    matches = {"hot": _match(gpu=256)}
    short = [
        Candidate("hot", True, 0, 3, queued_prefill_tokens=4000),
        Candidate("cold", True, 0, 0),
    ]
    assert KvAwarePolicy(weights=weights).choose(short, matches, 4300).engine == "hot"
    long = [Candidate("hot", True, 0, 3, queued_prefill_tokens=4200), Candidate("cold", True, 0, 0)]
    decision = KvAwarePolicy(weights=weights).choose(long, matches, 4300)
    assert (decision.engine, decision.policy) == ("cold", "kv_aware")
    # once "cold" holds the prefix too, the queues alone decide between the two holders
    both = {"hot": _match(gpu=256), "cold": _match(gpu=256)}
    queued = [
        Candidate("hot", True, 0, 3, queued_prefill_tokens=900),
        Candidate("cold", True, 0, 1, queued_prefill_tokens=200),
    ]
    assert KvAwarePolicy(weights=weights).choose(queued, both, 4300).engine == "cold"


def test_evicted_tokens_are_what_the_queue_and_the_prompt_need_beyond_the_unfilled_pool() -> None:
    assert evicted_tokens(1000, 0, 5000) == 0.0  # room for all of it
    assert evicted_tokens(1000, 0, 400) == 600.0
    assert evicted_tokens(1000, 4800, 5000) == 800.0  # the queue fills the room first
    assert evicted_tokens(1000, 9000, 5000) == 1000.0
    assert evicted_tokens(1000, -5, 0) == 1000.0  # a full pool evicts it all


def test_an_engine_with_a_full_pool_pays_for_what_its_prefill_evicts() -> None:
    weights = CostWeights(w_load=0.0, w_evict=1.0)
    assert kv_cost(_match(gpu=10), 0, 1000, weights, 0.0, None) == pytest.approx(840)  # unknown
    assert kv_cost(_match(gpu=10), 0, 1000, weights, 0.0, 10_000) == pytest.approx(840)
    assert kv_cost(_match(gpu=10), 0, 1000, weights, 0.0, 0) == pytest.approx(2 * 840)
    assert kv_cost(_match(gpu=10), 0, 1000, weights, 300.0, 500) == pytest.approx(
        840 + 300 + (840 - 200)
    )
    off = CostWeights(w_load=0.0, w_evict=0.0)
    assert kv_cost(_match(gpu=10), 0, 1000, off, 0.0, 0) == pytest.approx(840)


def test_with_full_pools_a_prefix_stays_on_its_holder_longer() -> None:
    # "hot" holds 4,096 of a 4,300-token prompt and has 4,200 tokens of prefill queued: without
    # the eviction term "cold" wins (4,300 against 4,404); with both pools full, copying the
    # prefix to "cold" evicts 4,300 cached tokens there, and the holder wins.
    matches = {"hot": _match(gpu=256)}
    full = [
        Candidate("hot", True, 0, 3, queued_prefill_tokens=4200, free_kv_tokens=0),
        Candidate("cold", True, 0, 0, free_kv_tokens=0),
    ]
    assert (
        KvAwarePolicy(weights=CostWeights(w_load=0.0, w_evict=0.0))
        .choose(full, matches, 4300)
        .engine
        == "cold"
    )
    decision = KvAwarePolicy(weights=CostWeights(w_load=0.0)).choose(full, matches, 4300)
    assert decision.engine == "hot"
    assert [s.free_kv_tokens for s in decision.scores] == [0, 0]
    # With room at "cold" the copy evicts nothing: the queue decides as before.
    roomy = [full[0], Candidate("cold", True, 0, 0, free_kv_tokens=100_000)]
    assert KvAwarePolicy(weights=CostWeights(w_load=0.0)).choose(roomy, matches, 4300).engine == (
        "cold"
    )


def test_imbalance_cap_keeps_choosing_by_cost_among_the_engines_it_allows() -> None:
    weights = CostWeights(w_load=1.0, imbalance_tokens=1000)
    candidates = [
        Candidate("hot", True, 5000, 9),
        Candidate("warm", True, 600, 2),
        Candidate("cold", True, 100, 1),
    ]
    # "hot" holds a huge prefix: by cost alone it would win; "warm" holds half of it
    matches = {"hot": _match(gpu=1000), "warm": _match(gpu=500)}
    decision = KvAwarePolicy(weights=weights).choose(candidates, matches, 16_000)
    assert decision.engine == "warm"  # not the least loaded "cold": the prefix still counts
    assert decision.policy == GUARD_POLICY_NAME
    assert decision.ranked == ["warm", "cold", "hot"]
    costs = {s.name: s.cost for s in decision.scores}
    assert costs == {"hot": 5016.0, "warm": 8600.0, "cold": 16_100.0}  # the kv cost stays visible


def test_imbalance_cap_ignores_unhealthy_engines() -> None:
    weights = CostWeights(imbalance_tokens=1000)
    candidates = [
        Candidate("down", False, 99_999, 50),
        Candidate("a", True, 100, 1),
        Candidate("b", True, 0, 0),
    ]
    decision = KvAwarePolicy(weights=weights).choose(candidates, {"a": _match(gpu=50)}, 1000)
    assert decision.policy == "kv_aware"
    assert decision.engine == "a"


def test_imbalance_cap_threshold_is_strictly_greater() -> None:
    weights = CostWeights(imbalance_tokens=1000)
    at_limit = [Candidate("a", True, 1000, 1), Candidate("b", True, 0, 0)]
    decision = KvAwarePolicy(weights=weights).choose(at_limit, {"a": _match(gpu=100)}, 2000)
    assert decision.policy == "kv_aware"
    over = [Candidate("a", True, 1001, 1), Candidate("b", True, 0, 0)]
    decision = KvAwarePolicy(weights=weights).choose(over, {"a": _match(gpu=100)}, 2000)
    assert (decision.policy, decision.engine) == (GUARD_POLICY_NAME, "b")


def test_default_cap_is_off_and_queue_weight_is_one() -> None:
    assert CostWeights().imbalance_tokens == 0
    assert CostWeights().w_queue == 1.0
    assert CostWeights().w_evict == 1.0
    assert CostWeights().medium == {"GPU": 1.0, "CPU": 0.8}
    assert CostWeights().other_medium == 0.5
    # without a cap any spread of load is left to the cost
    candidates = [Candidate("hot", True, 10**9, 900), Candidate("cold", True, 0, 0)]
    decision = KvAwarePolicy(weights=CostWeights(w_load=0.0)).choose(
        candidates, {"hot": _match(gpu=100)}, 2000
    )
    assert (decision.engine, decision.policy) == ("hot", "kv_aware")


def test_default_weights_value_a_cached_prefix_over_one_queued_request() -> None:
    # w_load 0.1, not the reference design's 1.0: see CostWeights and docs/design.md §6.
    assert (CostWeights().w_prefill, CostWeights().w_load) == (1.0, 0.1)


def test_without_tokens_kv_aware_routes_by_load() -> None:
    # a tokenization failure routes with prompt_tokens=0 and no matches
    candidates = [Candidate("a", True, 300, 1), Candidate("b", True, 200, 1)]
    assert KvAwarePolicy().choose(candidates, {}, 0).engine == "b"
