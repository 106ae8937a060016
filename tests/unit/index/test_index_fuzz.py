"""Arbitrary events never make the index raise or lose its internal consistency."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvroute.events.wire import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from kvroute.index import IndexLimits, PrefixIndex, source_id

SOURCES = [source_id("a", 0), source_id("b", 0)]
engine_hash = st.one_of(st.integers(0, 20), st.binary(min_size=1, max_size=2))
token = st.one_of(st.integers(0, 5), st.integers(-3, 2**33))
extra_key: Any = st.one_of(
    st.none(),
    st.text(max_size=2),
    st.integers(-1, 3),
    st.binary(max_size=2),
    st.lists(st.one_of(st.none(), st.text(max_size=2), st.integers(0, 2)), max_size=3),
)
stored = st.builds(
    BlockStored,
    block_hashes=st.lists(engine_hash, max_size=3),
    parent_block_hash=st.one_of(st.none(), engine_hash),
    token_ids=st.one_of(st.none(), st.lists(token, max_size=9)),
    block_size=st.one_of(st.none(), st.integers(-1, 3)),
    lora_id=st.one_of(st.none(), st.integers(0, 2)),
    medium=st.sampled_from([None, "GPU", "CPU", "DISK"]),
    lora_name=st.sampled_from([None, "x"]),
    extra_keys=st.one_of(st.none(), st.lists(extra_key, max_size=3)),
    group_idx=st.sampled_from([None, 0, 1]),
)
removed = st.builds(
    BlockRemoved,
    block_hashes=st.lists(engine_hash, max_size=3),
    medium=st.sampled_from([None, "GPU", "CPU"]),
    group_idx=st.sampled_from([None, 0, 1]),
)
event = st.one_of(stored, stored, removed, st.just(AllBlocksCleared()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.sampled_from(SOURCES), st.lists(event, max_size=4)), max_size=12),
    st.lists(st.integers(0, 5), max_size=12),
)
def test_arbitrary_events_never_raise_and_keep_counts_consistent(
    batches: list[tuple[Any, list[Any]]], prompt: list[int]
) -> None:
    index = PrefixIndex(IndexLimits(max_blocks_per_source=4, max_blocks_total=6))
    for s in SOURCES:
        index.add_source(s, engine=s.rpartition("/")[0], model="m")
    for source, events in batches:
        index.apply(source, EventBatch(0.0, events))
        held = set().union(*(index.holdings(s) for s in SOURCES))
        assert sum(index.blocks_by_model().values()) == len({h for h, _ in held})
        assert all(index.source_block_count(s) <= 4 for s in SOURCES)
        assert sum(index.source_block_count(s) for s in SOURCES) <= 6
        for lora in (None, "x"):
            for result in index.match("m", lora, prompt).values():
                assert 0 <= result.blocks <= len(prompt)
                assert sum(result.by_medium.values()) == result.blocks
    for s in SOURCES:
        index.reset_source(s)
    assert index.blocks_by_model() == {}
