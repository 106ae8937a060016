"""bench/ingest_workload.py: the comparison's event stream, its ground truth and its payloads."""

from __future__ import annotations

import pytest

from kvroute.bench.ingest_workload import (
    ChainedWorkload,
    encode_events,
    group_payloads,
    probe_event,
)
from kvroute.events import VllmBlockRemoved, VllmBlockStored, VllmEventBatch, encode_batch


def _model(events: list[object]) -> tuple[dict[int, int | None], dict[int, tuple[int, ...]]]:
    """A reference replay: held block → parent block (None: a root), and each block's tokens;
    asserts the stream's invariants on the way."""
    parent: dict[int, int | None] = {}
    tokens: dict[int, tuple[int, ...]] = {}
    for ev in events:
        if isinstance(ev, VllmBlockStored):
            assert ev.block_size == 16 and ev.medium == "GPU" and ev.token_ids is not None
            assert len(ev.block_hashes) == 4 and len(ev.token_ids) == 64
            prev = ev.parent_block_hash
            assert prev is None or prev in parent, "a store continues a held block"
            for i, h in enumerate(ev.block_hashes):
                assert h not in parent, "a hash is stored once"
                parent[h] = prev
                tokens[h] = tuple(ev.token_ids[16 * i : 16 * i + 16])
                prev = h
        else:
            assert isinstance(ev, VllmBlockRemoved) and len(ev.block_hashes) == 1
            (h,) = ev.block_hashes
            assert h in parent, "only held blocks are removed"
            assert h not in parent.values(), "only leaves are removed"
            del parent[h]
    return parent, tokens


def _matched(
    parent: dict[int, int | None], tokens: dict[int, tuple[int, ...]], ids: list[int]
) -> int:
    by_key = {(p, tokens[h]): h for h, p in parent.items()}
    prev: int | None = None
    n = 0
    for i in range(0, len(ids), 16):
        h = by_key.get((prev, tuple(ids[i : i + 16])))
        if h is None:
            break
        prev, n = h, n + 1
    return n


def test_same_seed_same_stream_and_another_seed_another() -> None:
    assert ChainedWorkload(seed=3).events(500) == ChainedWorkload(seed=3).events(500)
    assert ChainedWorkload(seed=3).events(500) != ChainedWorkload(seed=4).events(500)


def test_stream_shape_removal_share_and_leaf_removals() -> None:
    w = ChainedWorkload()
    events = w.events(6_000)
    removes = sum(isinstance(e, VllmBlockRemoved) for e in events)
    assert 0.08 < removes / len(events) < 0.12
    assert (w.stores, w.removes) == (len(events) - removes, removes)
    chained = sum(
        isinstance(e, VllmBlockStored) and e.parent_block_hash is not None for e in events
    )
    assert chained > 0.5 * w.stores
    parent, _tokens = _model(list(events))
    assert w.blocks_held == len(parent) and w.blocks_stored == 4 * w.stores


def test_token_ids_are_real_and_unique_per_block() -> None:
    w = ChainedWorkload()
    events = w.events(3_000)
    blocks = [
        tuple(e.token_ids[i : i + 16])
        for e in events
        if isinstance(e, VllmBlockStored) and e.token_ids is not None
        for i in range(0, 64, 16)
    ]
    assert len(set(blocks)) == len(blocks)
    assert all(0 <= t < 131_072 for b in blocks for t in b)
    assert w.block_tokens(1) == list(blocks[1])  # the first store's second block


def test_samples_match_a_reference_replay() -> None:
    w = ChainedWorkload(seed=7)
    parent, tokens = _model(list(w.events(8_000)))
    samples = w.samples(24, 8)
    assert [s.kind for s in samples] == ["stored"] * 24 + ["removed"] * 8
    for s in samples:
        assert len(s.token_ids) == 16 * s.full_blocks
        assert _matched(parent, tokens, s.token_ids) == s.expected_blocks
        if s.kind == "stored":
            assert s.expected_blocks == s.full_blocks
        else:
            assert s.expected_blocks < s.full_blocks
    assert any(s.full_blocks > 4 for s in samples), "some samples are chains of stores"
    assert w.samples(24, 8) == samples


def test_probes_stay_outside_the_workload() -> None:
    w = ChainedWorkload()
    events = w.events(2_000)
    hashes = {h for e in events if isinstance(e, VllmBlockStored) for h in e.block_hashes}
    firsts = {e.token_ids[0] for e in events if isinstance(e, VllmBlockStored) and e.token_ids}
    probes = [probe_event(k, 16) for k in range(300)]
    assert not hashes & {h for p in probes for h in p.block_hashes}
    assert all(p.token_ids is not None and p.token_ids[0] not in firsts for p in probes)
    assert len({tuple(p.token_ids or ()) for p in probes}) == 300
    assert all(p.parent_block_hash is None and len(p.token_ids or ()) == 16 for p in probes)


@pytest.mark.parametrize("per_message", [1, 10, 15, 16, 50, 333])
def test_grouped_payloads_are_the_publishers_own_bytes(per_message: int) -> None:
    encoded = encode_events(ChainedWorkload(), 1_000, chunk=128)
    events = ChainedWorkload().events(1_000)
    payloads = group_payloads(encoded, per_message)
    assert len(payloads) == -(-1_000 // per_message)
    for i, payload in enumerate(payloads):
        part = events[i * per_message : (i + 1) * per_message]
        assert payload == encode_batch(VllmEventBatch(ts=1.0, events=part))


@pytest.mark.parametrize("per_message", [0, -1, 65_536])
def test_group_payloads_refuses_impossible_sizes(per_message: int) -> None:
    with pytest.raises(ValueError, match="per_message"):
        group_payloads([b"\xc0"], per_message)


def test_workload_refuses_bad_parameters() -> None:
    with pytest.raises(ValueError, match="remove_share"):
        ChainedWorkload(remove_share=1.0)
    with pytest.raises(ValueError, match="block_size"):
        ChainedWorkload(block_size=1)
