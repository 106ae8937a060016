"""Arbitrary events never make the index raise or lose its internal consistency."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvroute.core import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, source_id
from kvroute.events import (
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEventBatch,
    normalise_batch,
)
from kvroute.index import IndexLimits
from tests.index_impl import new_index

SOURCES = [source_id("a", 0), source_id("b", 0)]
engine_hash = st.one_of(st.integers(0, 20), st.binary(min_size=1, max_size=2))
token = st.one_of(st.integers(0, 5), st.integers(-3, 2**33))
hashes = st.lists(engine_hash, max_size=3)
parent = st.one_of(st.none(), engine_hash)
token_ids = st.one_of(st.none(), st.lists(token, max_size=9))
block_size = st.one_of(st.none(), st.integers(-1, 3))
extra_key: Any = st.one_of(
    st.none(),
    st.text(max_size=2),
    st.integers(-1, 3),
    st.binary(max_size=2),
    st.lists(st.one_of(st.none(), st.text(max_size=2), st.integers(0, 2)), max_size=3),
)
# vLLM's events as sent: the decoder's normaliser turns them into the index's core events.
vllm_stored = st.builds(
    VllmBlockStored,
    block_hashes=hashes,
    parent_block_hash=parent,
    token_ids=token_ids,
    block_size=block_size,
    lora_id=st.one_of(st.none(), st.integers(0, 2)),
    medium=st.sampled_from([None, "GPU", "CPU", "DISK", "cpu"]),
    lora_name=st.sampled_from([None, "x"]),
    extra_keys=st.one_of(st.none(), st.lists(extra_key, max_size=3)),
    group_idx=st.sampled_from([None, 0, 1]),
)
vllm_removed = st.builds(
    VllmBlockRemoved,
    block_hashes=hashes,
    medium=st.sampled_from([None, "GPU", "CPU"]),
    group_idx=st.sampled_from([None, 0, 1]),
)
vllm_event = st.one_of(vllm_stored, vllm_stored, vllm_removed, st.just(VllmAllBlocksCleared()))
# Core events built directly reach every index path, salts included, whatever the decoder keeps.
core_stored = st.builds(
    BlockStored,
    block_hashes=hashes,
    parent_block_hash=parent,
    token_ids=token_ids,
    block_size=block_size,
    lora_name=st.sampled_from([None, "x"]),
    medium=st.sampled_from([None, "GPU", "CPU", "DISK"]),
    group_idx=st.sampled_from([None, 0, 1]),
    cache_salt=st.sampled_from([None, "", "s"]),
)
core_removed = st.builds(
    BlockRemoved,
    block_hashes=hashes,
    medium=st.sampled_from([None, "GPU", "CPU"]),
    group_idx=st.sampled_from([None, 0, 1]),
)
core_event = st.one_of(core_stored, core_stored, core_removed, st.just(AllBlocksCleared()))
batch = st.one_of(
    st.tuples(st.just("vllm"), st.lists(vllm_event, max_size=4)),
    st.tuples(st.just("core"), st.lists(core_event, max_size=4)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.sampled_from(SOURCES), batch), max_size=12),
    st.lists(st.integers(0, 5), max_size=12),
)
def test_arbitrary_events_never_raise_and_keep_counts_consistent(
    batches: list[tuple[Any, tuple[str, list[Any]]]], prompt: list[int]
) -> None:
    index = new_index(IndexLimits(max_blocks_per_source=4, max_blocks_total=6))
    for s in SOURCES:
        index.add_source(s, engine=s.rpartition("/")[0], model="m")
    for source, (kind, events) in batches:
        if kind == "vllm":
            core = normalise_batch(VllmEventBatch(0.0, events))
            assert len(core.events) + core.unsupported_events == len(events)
        else:
            core = EventBatch(0.0, events)
        index.apply(source, core)
        held = set().union(*(index.holdings(s) for s in SOURCES))
        assert sum(index.blocks_by_model().values()) == len({h for h, _ in held})
        assert all(index.source_block_count(s) <= 4 for s in SOURCES)
        assert sum(index.source_block_count(s) for s in SOURCES) <= 6
        for lora in (None, "x"):
            for salt in (None, "s"):
                for result in index.match("m", lora, prompt, cache_salt=salt).values():
                    assert 0 <= result.blocks <= len(prompt)
                    assert sum(result.by_medium.values()) == result.blocks
    for s in SOURCES:
        index.reset_source(s)
    assert index.blocks_by_model() == {}
