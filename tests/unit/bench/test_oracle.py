"""The trace bench's oracle: its matches come from the simulated engines' block pools (every DP
rank, evictions included), events never count, and the index's speculative entries still do."""

from __future__ import annotations

from collections.abc import Sequence

from kvroute.bench.oracle import OracleIndex
from kvroute.core import BlockStored, EventBatch, MatchResult, source_id
from kvroute.sim import BlockPool

MODEL = "m"
BS = 16
PROMPT = list(range(100, 100 + 8 * BS))  # 8 full blocks


def _pool(num_blocks: int = 32) -> BlockPool:
    return BlockPool(num_blocks, BS)


def _cache(pool: BlockPool, tokens: Sequence[int], lora: str | None = None) -> list[int]:
    """Enter the full blocks of `tokens` into `pool` as a scheduler would; their block ids."""
    digests = pool.chain_digests(tokens, lora)
    ids = pool.allocate(len(digests))
    pool.cache(ids, digests, None, list(tokens[: len(digests) * BS]), lora_name=lora)
    return ids


def _oracle(pools: dict[str, list[BlockPool]]) -> OracleIndex:
    return OracleIndex(lambda: pools)


def test_matches_are_the_longest_prefix_a_pool_holds() -> None:
    a, b = _pool(), _pool()
    _cache(a, PROMPT[: 5 * BS])
    _cache(b, PROMPT[: 2 * BS] + [7] * BS)  # diverges at block 2
    got = _oracle({"engine-a": [a], "engine-b": [b], "engine-c": [_pool()]}).match(
        MODEL, None, PROMPT
    )
    assert got == {
        "engine-a": MatchResult(blocks=5, tokens=5 * BS, by_medium={"GPU": 5}, block_size=BS),
        "engine-b": MatchResult(blocks=2, tokens=2 * BS, by_medium={"GPU": 2}, block_size=BS),
    }  # engine-c holds nothing: absent, as in PrefixIndex.match


def test_an_engine_scores_its_best_dp_rank() -> None:
    rank0, rank1 = _pool(), _pool()
    _cache(rank0, PROMPT[: 3 * BS])
    _cache(rank1, PROMPT[: 6 * BS])
    got = _oracle({"engine-a": [rank0, rank1]}).match(MODEL, None, PROMPT)
    assert got["engine-a"].blocks == 6


def test_the_pools_are_read_at_each_match_so_evictions_show_at_once() -> None:
    pool = _pool(num_blocks=8)
    ids = _cache(pool, PROMPT)
    oracle = _oracle({"engine-a": [pool]})
    assert oracle.match(MODEL, None, PROMPT)["engine-a"].blocks == 8
    pool.free(list(reversed(ids)))  # the request finished: cached, free, tail first in line
    pool.allocate(3)  # another request takes three blocks: the prompt's last three are evicted
    assert oracle.match(MODEL, None, PROMPT)["engine-a"].blocks == 5


def test_lora_blocks_match_only_their_adapter() -> None:
    pool = _pool()
    _cache(pool, PROMPT, lora="sql")
    oracle = _oracle({"engine-a": [pool]})
    assert oracle.match(MODEL, "sql", PROMPT)["engine-a"].blocks == 8
    assert oracle.match(MODEL, None, PROMPT) == {}


def test_events_never_count_only_the_pools_do() -> None:
    oracle = _oracle({"engine-a": [_pool()]})
    source = source_id("engine-a", 0)
    oracle.add_source(source, engine="engine-a", model=MODEL)
    stored = BlockStored(
        block_hashes=list(range(1, 9)), token_ids=PROMPT, block_size=BS, medium="GPU"
    )
    oracle.apply(source, EventBatch(ts=0.0, events=[stored]))
    # The reference index now holds the prompt (an event the pool never backed) ...
    assert oracle.holdings(source)
    # ... but the oracle reports what the pool holds: nothing.
    assert oracle.match(MODEL, None, PROMPT) == {}


def test_speculative_entries_of_routed_requests_still_count() -> None:
    pool = _pool()
    _cache(pool, PROMPT[: 2 * BS])
    oracle = _oracle({"engine-a": [pool], "engine-b": [_pool()]})
    oracle.add_source(source_id("engine-b", 0), engine="engine-b", model=MODEL)
    oracle.add_speculative("engine-b", MODEL, None, PROMPT)
    got = oracle.match(MODEL, None, PROMPT)
    assert got["engine-a"].blocks == 2 and got["engine-a"].speculative_blocks == 0
    assert got["engine-b"].blocks == 0 and got["engine-b"].speculative_blocks == 8
    assert got["engine-b"].block_size == BS


def test_blocks_the_events_claimed_but_the_pool_lost_do_not_come_back_as_speculative() -> None:
    pool = _pool()
    _cache(pool, PROMPT[: 2 * BS])  # the pool holds 2 blocks of the prompt
    oracle = _oracle({"engine-a": [pool]})
    source = source_id("engine-a", 0)
    oracle.add_source(source, engine="engine-a", model=MODEL)
    stored = BlockStored(
        block_hashes=list(range(1, 9)), token_ids=PROMPT, block_size=BS, medium="GPU"
    )
    oracle.apply(source, EventBatch(ts=0.0, events=[stored]))  # the events say 8 (stale)
    oracle.add_speculative("engine-a", MODEL, None, [5] * (4 * BS))  # another prompt routed
    got = oracle.match(MODEL, None, PROMPT)["engine-a"]
    assert (got.blocks, got.speculative_blocks) == (2, 0)


def test_speculative_blocks_extend_the_pools_prefix() -> None:
    pool = _pool()
    _cache(pool, PROMPT[: 3 * BS])
    oracle = _oracle({"engine-a": [pool]})
    oracle.add_source(source_id("engine-a", 0), engine="engine-a", model=MODEL)
    oracle.add_speculative("engine-a", MODEL, None, PROMPT[: 6 * BS])  # routed, not yet run
    got = oracle.match(MODEL, None, PROMPT)["engine-a"]
    assert (got.blocks, got.speculative_blocks) == (3, 6)
