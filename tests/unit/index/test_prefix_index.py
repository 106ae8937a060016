"""The sync prefix index: one test per rule (docs/architecture.md "Block hash").

The index consumes core events; which vLLM extra keys it can reproduce is the decoder's verdict
(tests/unit/events/test_normalise.py). End-to-end LoRA and salt checks feed it `normalise_batch`.
"""

from __future__ import annotations

from array import array
from typing import Any

import pytest

from kvroute.core import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DropReason,
    Event,
    EventBatch,
    MatchResult,
    SourceId,
    source_id,
)
from kvroute.errors import IndexStateError
from kvroute.events import VllmBlockStored, VllmEventBatch, decode_batch, normalise_batch
from kvroute.index import IndexLimits, PrefixIndex
from kvroute.index.hashing import prompt_hashes
from tests.index_impl import new_index
from tests.shared_fixtures import event_fixtures_dir, expected_json, fixture_versions

MODEL = "m"
A0 = source_id("a", 0)
A1 = source_id("a", 1)
B0 = source_id("b", 0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def engine_hashes(tokens: list[int], bs: int, tag: str = "engine") -> list[int]:
    """Stand-in engine hashes: one per prefix, unrelated to ours (as vLLM's are)."""
    return [h ^ 0x5A5A for h in prompt_hashes(tag, None, tokens, bs)]


def stored(
    tokens: list[int], bs: int, first: int = 0, last: int | None = None, **kw: Any
) -> BlockStored:
    """BlockStored for blocks [first, last) of `tokens`, chained from block first-1."""
    ehs = engine_hashes(tokens, bs, kw.pop("tag", "engine"))
    last = len(ehs) if last is None else last
    parent = ehs[first - 1] if first else None
    fields: dict[str, Any] = {"parent_block_hash": parent, "block_size": bs}
    fields.update(kw)
    return BlockStored(
        block_hashes=ehs[first:last], token_ids=tokens[first * bs : last * bs], **fields
    )


def vllm_stored(
    tokens: list[int], bs: int, first: int = 0, last: int | None = None, **kw: Any
) -> VllmBlockStored:
    """`stored` as vLLM sends it, with vLLM's own fields (`lora_id`, `extra_keys`, ...)."""
    core = stored(tokens, bs, first, last)
    return VllmBlockStored(
        block_hashes=core.block_hashes,
        parent_block_hash=core.parent_block_hash,
        token_ids=core.token_ids,
        block_size=bs,
        **kw,
    )


def normalised(*events: VllmBlockStored) -> EventBatch:
    """What the decoder hands the index for these vLLM events (each one kept)."""
    out = normalise_batch(VllmEventBatch(ts=1.0, events=list(events)))
    assert out.unsupported_events == 0
    return out


def removed(tokens: list[int], bs: int, block: int, **kw: Any) -> BlockRemoved:
    return BlockRemoved(block_hashes=[engine_hashes(tokens, bs)[block]], **kw)


def batch(*events: Event) -> EventBatch:
    return EventBatch(ts=1.0, events=list(events))


def make_index(*sources: SourceId, **limits: Any) -> PrefixIndex:
    clock = limits.pop("clock", None)
    index = new_index(IndexLimits(**limits), clock=clock or Clock())
    for s in sources:
        engine, _, _ = s.rpartition("/")
        index.add_source(s, engine=engine, model=MODEL)
    return index


def dropped(index: PrefixIndex, source: SourceId, reason: DropReason) -> int:
    return index.counters.dropped[(source, reason.value)]


TOKENS = list(range(1000, 1064))  # 4 blocks of 16


# --- storing and matching -------------------------------------------------------------------


def test_stored_prefix_matches_with_tokens_and_gpu_medium() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16)))
    assert index.match(MODEL, None, TOKENS) == {
        "a": MatchResult(blocks=4, tokens=64, by_medium={"GPU": 4}, block_size=16)
    }
    assert index.counters.applied[(A0, "BlockStored")] == 1


def test_match_is_the_longest_prefix_of_the_request() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16, 0, 2)))
    request = [*TOKENS[:32], 1, 2, 3] + [9] * 40
    assert index.match(MODEL, None, request)["a"].blocks == 2
    assert index.match(MODEL, None, [5, *TOKENS]) == {}


def test_chaining_across_events_through_the_parent() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16, 0, 1)))
    index.apply(A0, batch(stored(TOKENS, 16, 1, 3)))
    index.apply(A0, batch(stored(TOKENS, 16, 3, 4)))
    assert index.match(MODEL, None, TOKENS)["a"].blocks == 4


def test_orphan_is_counted_and_not_indexed() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16, 1, 3)))
    assert dropped(index, A0, DropReason.ORPHAN) == 1
    assert index.source_block_count(A0) == 0
    index.apply(A0, batch(stored(TOKENS, 16, 3, 4)))  # its child is an orphan too
    assert dropped(index, A0, DropReason.ORPHAN) == 2
    assert index.match(MODEL, None, TOKENS) == {}


def test_parent_is_looked_up_in_the_sources_own_map() -> None:
    index = make_index(A0, B0)
    index.apply(A0, batch(stored(TOKENS, 16, 0, 1)))
    index.apply(B0, batch(stored(TOKENS, 16, 1, 2)))
    assert dropped(index, B0, DropReason.ORPHAN) == 1


def test_contiguous_prefix_stops_at_the_first_missing_block() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16)))
    index.apply(A0, batch(removed(TOKENS, 16, 2)))
    assert index.match(MODEL, None, TOKENS)["a"].blocks == 2


@pytest.mark.parametrize("tokens", [15, 17, 0])
def test_misaligned_token_ids_are_dropped(tokens: int) -> None:
    index = make_index(A0)
    event = BlockStored(block_hashes=[1], token_ids=list(range(tokens)), block_size=16)
    index.apply(A0, batch(event))
    assert dropped(index, A0, DropReason.MISALIGNED) == 1
    assert index.source_block_count(A0) == 0


def test_missing_token_ids_or_block_size_are_misaligned() -> None:
    index = make_index(A0)
    index.apply(A0, batch(BlockStored(block_hashes=[1], block_size=16)))
    index.apply(A0, batch(BlockStored(block_hashes=[1], token_ids=list(range(16)))))
    assert dropped(index, A0, DropReason.MISALIGNED) == 2


def test_token_ids_outside_uint32_are_malformed_not_raised() -> None:
    index = make_index(A0)
    event = BlockStored(block_hashes=[1, 2], token_ids=[-1] * 8, block_size=4)
    index.apply(
        A0, batch(event, BlockStored(block_hashes=[3], token_ids=[2**40] * 4, block_size=4))
    )
    assert dropped(index, A0, DropReason.MALFORMED) == 2
    assert index.source_block_count(A0) == 0


def test_group_none_and_indexed_group_are_indexed_others_dropped() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16, 0, 1, group_idx=None)))
    index.apply(A0, batch(stored(TOKENS, 16, 1, 2, group_idx=0)))
    index.apply(A0, batch(stored(TOKENS, 16, 2, 3, group_idx=1)))
    index.apply(A0, batch(removed(TOKENS, 16, 0, group_idx=1)))
    assert dropped(index, A0, DropReason.WRONG_GROUP) == 2
    assert index.match(MODEL, None, TOKENS)["a"].blocks == 2


def test_indexed_group_is_configurable() -> None:
    index = make_index(A0, indexed_group=2)
    index.apply(A0, batch(stored(TOKENS, 16, 0, 1, group_idx=0)))
    index.apply(A0, batch(stored(TOKENS, 16, 0, 1, group_idx=2)))
    assert dropped(index, A0, DropReason.WRONG_GROUP) == 1
    assert index.source_block_count(A0) == 1


# --- reference counting and media --------------------------------------------------------


def test_duplicate_stores_are_reference_counted() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16, 0, 1), stored(TOKENS, 16, 0, 1)))
    index.apply(A0, batch(removed(TOKENS, 16, 0)))
    assert index.match(MODEL, None, TOKENS)["a"].blocks == 1
    index.apply(A0, batch(removed(TOKENS, 16, 0)))
    assert index.match(MODEL, None, TOKENS) == {}
    index.apply(A0, batch(removed(TOKENS, 16, 0)))
    assert dropped(index, A0, DropReason.UNKNOWN_BLOCK) == 1
    assert index.counters.applied[(A0, "BlockRemoved")] == 2


def test_cpu_removal_never_drops_the_gpu_copy() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16), stored(TOKENS, 16, medium="CPU")))
    index.apply(A0, batch(*(removed(TOKENS, 16, i, medium="CPU") for i in range(4))))
    assert index.match(MODEL, None, TOKENS)["a"].by_medium == {"GPU": 4}
    assert index.holdings(A0) == {(h, "GPU") for h in prompt_hashes(MODEL, None, TOKENS, 16)}


def test_missing_medium_is_gpu() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16, medium=None)))
    index.apply(A0, batch(*(removed(TOKENS, 16, i, medium="GPU") for i in range(4))))
    assert index.source_block_count(A0) == 0


def test_by_medium_counts_each_block_once_under_its_best_medium() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16, medium="DISK"), stored(TOKENS, 16, medium="CPU")))
    index.apply(A0, batch(stored(TOKENS, 16, 0, 1)))  # block 0 also on GPU
    index.apply(A0, batch(removed(TOKENS, 16, 3, medium="CPU")))  # block 3 on disk only
    result = index.match(MODEL, None, TOKENS)["a"]
    assert result.blocks == 4
    assert result.by_medium == {"GPU": 1, "CPU": 2, "DISK": 1}


def test_gpu_removal_keeps_a_cpu_copy_matchable() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16), stored(TOKENS, 16, medium="CPU")))
    index.apply(A0, batch(*(removed(TOKENS, 16, i) for i in range(4))))
    assert index.match(MODEL, None, TOKENS)["a"].by_medium == {"CPU": 4}
    index.apply(A0, batch(*(removed(TOKENS, 16, i, medium="CPU") for i in range(4))))
    assert index.match(MODEL, None, TOKENS) == {}
    assert index.blocks_by_model() == {}


def test_cpu_chain_can_continue_from_a_cpu_parent() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16, 0, 2, medium="CPU")))
    index.apply(A0, batch(stored(TOKENS, 16, 2, 4, medium="CPU")))
    assert index.match(MODEL, None, TOKENS)["a"].by_medium == {"CPU": 4}


def test_two_engine_hashes_for_one_prefix_are_both_counted() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16, 0, 1), stored(TOKENS, 16, 0, 1, tag="other")))
    index.apply(A0, batch(removed(TOKENS, 16, 0)))
    assert index.match(MODEL, None, TOKENS)["a"].blocks == 1
    other = engine_hashes(TOKENS, 16, "other")[0]
    index.apply(A0, batch(BlockRemoved(block_hashes=[other])))
    assert index.match(MODEL, None, TOKENS) == {}


def test_an_engine_hash_reused_for_another_prefix_replaces_it() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16, 0, 1)))
    eh = engine_hashes(TOKENS, 16)[0]
    other = list(range(16))
    index.apply(A0, batch(BlockStored(block_hashes=[eh], token_ids=other, block_size=16)))
    assert index.match(MODEL, None, TOKENS) == {}
    assert index.match(MODEL, None, other)["a"].blocks == 1
    assert index.blocks_by_model() == {MODEL: 1}


# --- clear, reset, stale, sources ------------------------------------------------------------


def test_all_blocks_cleared_drops_the_source_and_leaves_stale_as_set() -> None:
    index = make_index(A0, B0)
    index.apply(A0, batch(stored(TOKENS, 16)))
    index.apply(B0, batch(stored(TOKENS, 16)))
    index.set_stale(A0, True)
    index.apply(A0, batch(AllBlocksCleared(), stored(TOKENS, 16, 0, 1)))
    # Staleness has one owner (the tracker): the index never clears it by itself.
    assert index.is_stale(A0)
    assert index.source_block_count(A0) == 1
    assert index.counters.applied[(A0, "AllBlocksCleared")] == 1
    assert {e: r.blocks for e, r in index.match(MODEL, None, TOKENS).items()} == {"b": 4}
    index.set_stale(A0, False)
    assert {e: r.blocks for e, r in index.match(MODEL, None, TOKENS).items()} == {"a": 1, "b": 4}


def test_reset_source_drops_only_that_source() -> None:
    index = make_index(A0, B0)
    index.apply(A0, batch(stored(TOKENS, 16)))
    index.apply(B0, batch(stored(TOKENS, 16)))
    index.reset_source(A0)
    assert index.source_block_count(A0) == 0
    assert set(index.match(MODEL, None, TOKENS)) == {"b"}
    assert index.blocks_by_model() == {MODEL: 4}
    index.apply(A0, batch(stored(TOKENS, 16, 1, 2)))  # its old parents are gone
    assert dropped(index, A0, DropReason.ORPHAN) == 1


def test_reset_source_leaves_stale_as_set() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16)))
    index.set_stale(A0, True)
    index.reset_source(A0)
    assert index.is_stale(A0)  # only `set_stale` changes it (the tracker is its owner)
    assert index.stale_engines() == {"a"}
    index.apply(A0, batch(stored(TOKENS, 16)))
    assert index.match(MODEL, None, TOKENS) == {}
    index.set_stale(A0, False)
    assert index.match(MODEL, None, TOKENS)["a"].blocks == 4


def test_stale_engines_are_those_with_a_stale_source() -> None:
    index = make_index(A0, A1, B0)
    assert index.stale_engines() == frozenset()
    index.set_stale(A0, True)
    index.set_stale(A1, True)
    index.set_stale(B0, True)
    assert index.stale_engines() == {"a", "b"}
    index.set_stale(A0, False)
    assert index.stale_engines() == {"a", "b"}  # rank 1 of engine a is still stale
    index.set_stale(A1, False)
    index.remove_source(B0)
    assert index.stale_engines() == frozenset()


def test_stale_sources_do_not_match() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16)))
    index.set_stale(A0, True)
    assert index.is_stale(A0)
    assert index.match(MODEL, None, TOKENS) == {}
    index.set_stale(A0, False)
    assert index.match(MODEL, None, TOKENS)["a"].blocks == 4


def test_engine_scores_the_max_over_its_non_stale_ranks() -> None:
    index = make_index(A0, A1)
    index.apply(A0, batch(stored(TOKENS, 16)))
    index.apply(A1, batch(stored(TOKENS, 16, 0, 2)))
    assert index.match(MODEL, None, TOKENS)["a"].blocks == 4
    index.set_stale(A0, True)
    assert index.match(MODEL, None, TOKENS)["a"].blocks == 2


def test_events_of_unknown_sources_are_ignored_and_counted() -> None:
    index = make_index(A0)
    index.apply(B0, batch(stored(TOKENS, 16), AllBlocksCleared()))
    assert dropped(index, B0, DropReason.UNKNOWN_SOURCE) == 2
    assert index.match(MODEL, None, TOKENS) == {}


def test_add_source_is_idempotent_and_rejects_a_conflict() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16)))
    index.add_source(A0, engine="a", model=MODEL)
    assert index.source_block_count(A0) == 4
    with pytest.raises(IndexStateError, match="already added"):
        index.add_source(A0, engine="a", model="other")


def test_removed_source_frees_its_blocks_and_its_bit() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16)))
    index.remove_source(A0)
    index.remove_source(A0)
    assert index.blocks_by_model() == {}
    index.add_source(B0, engine="b", model=MODEL)  # reuses the bit
    assert index.match(MODEL, None, TOKENS) == {}
    assert index.source_block_count(A0) == 0
    assert not index.is_stale(A0)


# --- partitions -----------------------------------------------------------------------------


def test_lora_adapters_never_match_each_other_or_the_base_model() -> None:
    index = make_index(A0, B0)
    index.apply(A0, batch(stored(TOKENS, 16, lora_name="sql")))
    index.apply(B0, batch(stored(TOKENS, 16)))
    assert set(index.match(MODEL, "sql", TOKENS)) == {"a"}
    assert set(index.match(MODEL, None, TOKENS)) == {"b"}
    assert index.match(MODEL, "chat", TOKENS) == {}


def test_models_are_separate() -> None:
    index = make_index(A0)
    index.add_source(B0, engine="b", model="other")
    index.apply(A0, batch(stored(TOKENS, 16)))
    index.apply(B0, batch(stored(TOKENS, 16)))
    assert set(index.match(MODEL, None, TOKENS)) == {"a"}
    assert set(index.match("other", None, TOKENS)) == {"b"}
    assert index.blocks_by_model() == {MODEL: 4, "other": 4}


def test_engines_with_different_block_sizes_each_match_their_own() -> None:
    index = make_index(A0, B0)
    index.apply(A0, batch(stored(TOKENS, 16)))
    index.apply(B0, batch(stored(TOKENS, 32)))
    assert index.block_sizes(MODEL) == {16, 32}
    result = index.match(MODEL, None, TOKENS)
    assert result["a"] == MatchResult(4, 64, {"GPU": 4}, 0, 16)
    assert result["b"] == MatchResult(2, 64, {"GPU": 2}, 0, 32)


# --- LoRA and cache salt ---------------------------------------------------------------------


def test_cache_salt_seeds_block_zero_only() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16, 0, 2, cache_salt="s1")))
    index.apply(A0, batch(stored(TOKENS, 16, 2, 4, cache_salt="ignored")))  # has a parent
    assert index.match(MODEL, None, TOKENS) == {}
    assert index.match(MODEL, None, TOKENS, cache_salt="s1")["a"].blocks == 4
    assert index.match(MODEL, None, TOKENS, cache_salt="s2") == {}


def test_lora_event_with_its_name_in_extra_keys_matches_the_lora_prompt() -> None:
    index = make_index(A0)
    event = vllm_stored(TOKENS, 16, lora_name="sql", extra_keys=[["sql"], None, ["sql"], ("sql",)])
    index.apply(A0, normalised(event))
    assert index.match(MODEL, "sql", TOKENS)["a"].blocks == 4
    assert index.match(MODEL, None, TOKENS) == {}


def test_salted_event_matches_only_the_salted_prompt() -> None:
    index = make_index(A0)
    index.apply(A0, normalised(vllm_stored(TOKENS, 16, 0, 2, extra_keys=[["s1"], None])))
    index.apply(A0, normalised(vllm_stored(TOKENS, 16, 2, 4)))
    assert index.match(MODEL, None, TOKENS) == {}
    assert index.match(MODEL, None, TOKENS, cache_salt="s1")["a"].blocks == 4
    assert index.match(MODEL, None, TOKENS, cache_salt="s2") == {}


def test_tagged_lora_and_salt_event_matches_the_salted_lora_prompt() -> None:
    index = make_index(A0)
    keys = [[["lora", "sql", "/path"], ["cache_salt", "s"]], [["lora", "sql", "/path"]]]
    index.apply(A0, normalised(vllm_stored(TOKENS, 16, 0, 2, lora_name="sql", extra_keys=keys)))
    assert index.match(MODEL, "sql", TOKENS, cache_salt="s")["a"].blocks == 2
    assert index.match(MODEL, "sql", TOKENS) == {}


# --- bounds ---------------------------------------------------------------------------------


def test_per_source_cap_drops_least_recently_stored_blocks() -> None:
    index = make_index(A0, B0, max_blocks_per_source=3)
    other = list(range(64))
    index.apply(A0, batch(stored(TOKENS, 16, 0, 2)))
    index.apply(A0, batch(stored(other, 16, 0, 1)))
    index.apply(A0, batch(stored(TOKENS, 16, 0, 1)))  # re-store: block 0 is recent again
    index.apply(A0, batch(stored(other, 16, 1, 2)))
    assert dropped(index, A0, DropReason.OVER_LIMIT) == 1
    assert index.source_block_count(A0) == 3
    assert index.match(MODEL, None, TOKENS)["a"].blocks == 1  # block 1 was evicted
    assert index.match(MODEL, None, other)["a"].blocks == 2
    index.apply(A0, batch(removed(TOKENS, 16, 1)))
    assert dropped(index, A0, DropReason.UNKNOWN_BLOCK) == 1
    index.apply(A0, batch(removed(TOKENS, 16, 0), removed(TOKENS, 16, 0)))
    assert index.match(MODEL, None, TOKENS) == {}


def test_global_cap_evicts_from_the_largest_source() -> None:
    index = make_index(A0, B0, max_blocks_total=5)
    other = list(range(64))
    index.apply(A0, batch(stored(TOKENS, 16)))
    index.apply(B0, batch(stored(other, 16, 0, 2)))
    assert dropped(index, A0, DropReason.OVER_LIMIT) == 1
    assert index.source_block_count(A0) == 3
    assert index.source_block_count(B0) == 2
    # the oldest block (block 0) went, so nothing of a's chain matches any more
    assert index.match(MODEL, None, TOKENS) == {}
    assert index.match(MODEL, None, other)["b"].blocks == 2


def test_the_byte_budget_bounds_entries_at_the_implementations_cost() -> None:
    probe = make_index()
    per_entry = type(probe).entry_bytes
    index = make_index(A0, B0, max_index_bytes=per_entry * 5)
    other = list(range(64))
    index.apply(A0, batch(stored(TOKENS, 16)))
    index.apply(B0, batch(stored(other, 16, 0, 2)))
    # Six entries do not fit five entries' bytes: the largest source gives up its oldest block.
    assert dropped(index, A0, DropReason.OVER_LIMIT) == 1
    assert (index.source_block_count(A0), index.source_block_count(B0)) == (3, 2)
    assert index.match(MODEL, None, other)["b"].blocks == 2
    memory = index.memory()
    assert memory["budget"] == per_entry * 5
    assert memory["entries"] == 5 and memory["accounted"] == 5 * per_entry
    assert memory["capacity"] == 5


def test_the_default_budget_holds_millions_of_blocks_with_no_per_source_cap() -> None:
    # The ingest comparison's workload holds 1.75 M blocks of one engine (issue 12): the
    # defaults must keep all of them, whichever implementation runs.
    index = make_index()
    assert index.memory()["capacity"] >= 4_000_000
    assert index._block_cap >= 1 << 40


def test_eviction_keeps_counts_consistent_after_clear_and_reset() -> None:
    index = make_index(A0, B0, max_blocks_total=6)
    for i in range(5):
        index.apply(A0, batch(stored([i] * 64, 16)))
        index.apply(B0, batch(stored([i] * 64, 16)))
    assert index.source_block_count(A0) + index.source_block_count(B0) <= 6
    index.apply(A0, batch(AllBlocksCleared()))
    index.reset_source(B0)
    assert index.blocks_by_model() == {}
    index.apply(A0, batch(stored(TOKENS, 16)))
    assert index.match(MODEL, None, TOKENS)["a"].blocks == 4


# --- speculative entries --------------------------------------------------------------------


def test_speculative_entries_are_reported_apart_and_expire() -> None:
    clock = Clock()
    index = make_index(A0, B0, clock=clock, speculative_ttl_s=2.0)
    index.apply(A0, batch(stored(TOKENS, 16, 0, 1)))
    index.add_speculative("b", MODEL, None, TOKENS[:48])
    result = index.match(MODEL, None, TOKENS)
    assert result["b"] == MatchResult(0, 0, {}, 3, 16)
    assert result["a"].speculative_blocks == 0
    clock.now += 2.5
    assert "b" not in index.match(MODEL, None, TOKENS)


def test_speculative_covers_confirmed_or_unexpired_blocks() -> None:
    clock = Clock()
    index = make_index(A0, clock=clock)
    index.apply(A0, batch(stored(TOKENS, 16, 0, 2)))
    index.add_speculative("a", MODEL, None, TOKENS)
    assert index.match(MODEL, None, TOKENS)["a"] == MatchResult(2, 32, {"GPU": 2}, 4, 16)


def test_a_confirming_block_stored_replaces_the_speculative_entry() -> None:
    clock = Clock()
    index = make_index(A0, clock=clock)
    index.apply(A0, batch(stored(TOKENS, 16, 0, 1)))
    index.add_speculative("a", MODEL, None, TOKENS)
    index.apply(A0, batch(stored(TOKENS, 16, 1, 2)))  # confirms block 1
    index.apply(A0, batch(removed(TOKENS, 16, 1)))  # ...which is then evicted by the engine
    result = index.match(MODEL, None, TOKENS)["a"]
    assert (result.blocks, result.speculative_blocks) == (1, 1)


def test_speculative_entries_are_bounded_per_engine() -> None:
    index = make_index(A0, max_speculative_per_engine=3)
    index.apply(A0, batch(stored(TOKENS, 16, 0, 1)))
    for i in range(50):
        index.add_speculative("b", MODEL, None, [i] * 64)
    assert index.match(MODEL, None, [49] * 64)["b"].speculative_blocks == 3
    assert "b" not in index.match(MODEL, None, [0] * 64)


def test_one_prompt_enters_at_most_max_speculative_per_request_blocks() -> None:
    index = make_index(A0, max_speculative_per_request=3)
    index.apply(A0, batch(stored(TOKENS, 16, 0, 1)))
    long_prompt = list(range(10 * 16))
    index.add_speculative("b", MODEL, None, long_prompt)
    assert index.match(MODEL, None, long_prompt)["b"].speculative_blocks == 3
    assert index.speculative_head(MODEL, None, long_prompt) == long_prompt[: 3 * 16]
    short = TOKENS[:32]
    assert index.speculative_head(MODEL, None, short) is short  # within the cap: as it is
    # Confirmed blocks past the cap still count in full next to speculative ones.
    index.apply(A0, batch(stored(long_prompt[: 5 * 16], 16)))
    result = index.match(MODEL, None, long_prompt)
    assert (result["a"].blocks, result["b"].speculative_blocks) == (5, 3)
    index.add_speculative("a", MODEL, None, long_prompt)
    assert index.match(MODEL, None, long_prompt)["a"].speculative_blocks == 5


def test_a_prompt_as_an_array_of_u32_matches_as_the_list_does() -> None:
    # gateway/prompt_worker.py hands long prompts over as array("I"): no Python int per token.
    index = make_index(A0, B0)
    index.apply(A0, batch(stored(TOKENS, 16)))
    index.apply(B0, batch(stored(TOKENS[:32], 16)))
    index.add_speculative("b", MODEL, None, array("I", TOKENS))
    for prompt in (TOKENS, TOKENS + [5] * 20, TOKENS[:40], [1] * 64):
        assert index.match(MODEL, None, array("I", prompt)) == index.match(MODEL, None, prompt)


def test_speculative_before_any_event_uses_the_default_block_size() -> None:
    index = make_index(A0, default_block_size=16)
    index.add_speculative("a", MODEL, None, TOKENS)
    assert index.match(MODEL, None, TOKENS) == {"a": MatchResult(0, 0, {}, 4, 16)}
    assert index.match(MODEL, "lora", TOKENS) == {}
    index.apply(A0, batch(stored([7] * 32, 32)))  # the model's sizes are known from now on
    index.add_speculative("b", MODEL, "lora", TOKENS)
    assert index.match(MODEL, "lora", TOKENS) == {"b": MatchResult(0, 0, {}, 2, 32)}


# --- queries and fixtures -------------------------------------------------------------------


def test_holdings_counts_and_block_sizes() -> None:
    index = make_index(A0, B0)
    index.apply(A0, batch(stored(TOKENS, 16), stored(TOKENS, 16, 0, 1, medium="CPU")))
    index.apply(B0, batch(stored(TOKENS, 16, 0, 2)))
    ours = prompt_hashes(MODEL, None, TOKENS, 16)
    assert index.holdings(A0) == {(h, "GPU") for h in ours} | {(ours[0], "CPU")}
    assert index.source_block_count(A0) == 5
    assert index.blocks_by_model() == {MODEL: 4}
    assert index.block_sizes(MODEL) == {16}
    assert index.block_sizes("unknown") == set()
    assert index.holdings(source_id("zz", 0)) == set()


def test_match_raises_for_token_ids_outside_uint32() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16)))
    with pytest.raises(IndexStateError):
        index.match(MODEL, None, [-1] * 32)


@pytest.mark.parametrize("version", fixture_versions())
def test_shared_fixture_chain_and_continue_match_tokens_1_to_20(version: str) -> None:
    index = make_index(A0)
    folder = event_fixtures_dir() / version
    for name in ("chain", "continue", "remove_clear"):
        payload = decode_batch((folder / f"{name}.msgpack").read_bytes())
        index.apply(A0, payload)
        if name == "continue":
            assert index.match(MODEL, None, list(range(1, 21)))["a"].blocks == 5
    assert index.source_block_count(A0) == 0
    if "bytes_hashes" in expected_json(version)["scenarios"]:
        index.apply(A0, decode_batch((folder / "bytes_hashes.msgpack").read_bytes()))
        assert dropped(index, A0, DropReason.UNKNOWN_BLOCK) == 1
        assert dropped(index, A0, DropReason.ORPHAN) == 1


# --- odd but valid input ----------------------------------------------------------------------


def test_bytes_engine_hashes_chain_and_remove() -> None:
    index = make_index(A0)
    ehs = [bytes([i]) * 32 for i in range(4)]
    index.apply(A0, batch(BlockStored(block_hashes=ehs[:2], token_ids=TOKENS[:32], block_size=16)))
    index.apply(
        A0,
        batch(
            BlockStored(
                block_hashes=ehs[2:], parent_block_hash=ehs[1], token_ids=TOKENS[32:], block_size=16
            )
        ),
    )
    assert index.match(MODEL, None, TOKENS)["a"].blocks == 4
    index.apply(A0, batch(BlockRemoved(block_hashes=[ehs[1]])))
    assert index.match(MODEL, None, TOKENS)["a"].blocks == 1


def test_token_ids_as_a_tuple_hash_like_a_list() -> None:
    index = make_index(A0)
    ev = stored(TOKENS, 16, 0, 1)
    as_tuple = BlockStored(
        block_hashes=ev.block_hashes,
        token_ids=tuple(TOKENS[:16]),  # type: ignore[arg-type]
        block_size=16,
    )
    index.apply(A0, batch(as_tuple))
    assert index.match(MODEL, None, TOKENS)["a"].blocks == 1


def test_an_event_without_blocks_is_applied_as_a_no_op() -> None:
    index = make_index(A0)
    index.apply(A0, batch(BlockStored(block_hashes=[], token_ids=[], block_size=16)))
    index.apply(A0, batch(BlockRemoved(block_hashes=[])))
    assert index.counters.applied[(A0, "BlockStored")] == 1
    assert index.counters.applied[(A0, "BlockRemoved")] == 1
    assert index.source_block_count(A0) == 0


def test_lora_event_named_by_id_in_extra_keys_matches_the_lora_prompt() -> None:
    index = make_index(A0)
    event = vllm_stored(TOKENS, 16, 0, 1, lora_name="sql", lora_id=7, extra_keys=[[7]])
    index.apply(A0, normalised(event))
    assert index.match(MODEL, "sql", TOKENS)["a"].blocks == 1


def test_unknown_sources_answer_empty_and_never_raise() -> None:
    index = make_index(A0)
    ghost = source_id("ghost", 0)
    index.set_stale(ghost, True)
    index.reset_source(ghost)
    assert not index.is_stale(ghost)
    assert index.source_block_count(ghost) == 0


def test_steady_churn_at_the_per_source_cap_stays_consistent() -> None:
    index = make_index(A0, B0, max_blocks_per_source=512)
    for i in range(3000):
        tokens = [i, *range(15)]
        index.apply(A0, batch(stored(tokens, 16)))
        if i % 3 == 0:
            index.apply(B0, batch(stored(tokens, 16)))
    assert 500 <= index.source_block_count(A0) <= 512
    assert dropped(index, A0, DropReason.OVER_LIMIT) == 3000 - index.source_block_count(A0)
    held = index.holdings(A0) | index.holdings(B0)
    assert sum(index.blocks_by_model().values()) == len({h for h, _ in held})
    assert index.match(MODEL, None, [2999, *range(15)])["a"].blocks == 1
    assert "a" not in index.match(MODEL, None, [0, *range(15)])


def test_speculative_with_lora_and_salt_matches_only_that_partition() -> None:
    index = make_index(A0)
    index.apply(A0, batch(stored(TOKENS, 16, 0, 1, lora_name="sql")))
    index.add_speculative("b", MODEL, "sql", TOKENS, cache_salt="s")
    assert index.match(MODEL, "sql", TOKENS, cache_salt="s")["b"].speculative_blocks == 4
    assert "b" not in index.match(MODEL, "sql", TOKENS)
    assert index.match(MODEL, None, TOKENS) == {}


def test_counters_are_shared_with_metrics_and_exported() -> None:
    from prometheus_client import generate_latest

    from kvroute.metrics import Metrics

    metrics = Metrics()
    index = new_index(counters=metrics.event_counters)
    index.add_source(A0, engine="a", model=MODEL)
    index.apply(A0, batch(stored(TOKENS, 16, 0, 1), stored(TOKENS, 16, 2, 3)))
    text = generate_latest(metrics.registry).decode()
    assert 'kvroute_events_applied_total{source="a/0",type="BlockStored"} 1.0' in text
    assert 'kvroute_events_dropped_total{reason="orphan",source="a/0"} 1.0' in text


def test_engine_counts_sum_an_engines_sources_blocks_and_removals() -> None:
    # kv_aware's pool state reads these (gateway/service.py `_with_kv_state`)
    index = make_index(A0, A1, B0)
    index.apply(A0, batch(stored(TOKENS, 16, 0, 4)))
    index.apply(A1, batch(stored(TOKENS, 16, 0, 2)))
    index.apply(B0, batch(stored(TOKENS, 16, 0, 1)))
    assert index.engine_block_counts() == {"a": 6, "b": 1}
    assert index.engine_removed_counts() == {"a": 0, "b": 0}
    ehs = engine_hashes(TOKENS, 16)
    index.apply(A0, batch(BlockRemoved(block_hashes=[ehs[3]]), BlockRemoved(block_hashes=[ehs[2]])))
    index.apply(A1, batch(BlockRemoved(block_hashes=[ehs[1]])))
    assert index.engine_block_counts() == {"a": 3, "b": 1}
    assert index.engine_removed_counts() == {"a": 3, "b": 0}
    index.remove_source(A1)  # its count goes with it
    assert index.engine_removed_counts() == {"a": 2, "b": 0}
