"""The match walk (index/matching.py): its GPU-only loop agrees with the general one."""

from __future__ import annotations

import random

import pytest

from kvroute.core import BlockStored, EventBatch, source_id
from kvroute.index import seed_hash
from kvroute.index.matching import match_size
from tests.index_impl import new_index

MODEL = "m"
BS = 4


@pytest.mark.parametrize("seed", range(8), ids=lambda s: f"seed-{s}")
def test_gpu_only_walk_agrees_with_the_general_walk(seed: int) -> None:
    rng = random.Random(seed)
    index = new_index()
    sources = [source_id(f"e{i // 2}", i % 2) for i in range(12)]
    for s in sources:
        index.add_source(s, engine=s.rpartition("/")[0], model=MODEL)
    prompt = [rng.randrange(8) for _ in range(16 * BS)]
    for k, s in enumerate(sources):
        held = rng.randint(1, 16)
        hashes = [k * 100 + i for i in range(held)]
        index.apply(s, EventBatch(0.0, [BlockStored(hashes, None, prompt[: held * BS], BS)]))
    n = len(prompt) // BS
    everyone = sum(1 << i for i in range(len(sources)))
    args = (prompt, n, BS, seed_hash(MODEL), everyone, 0.0)
    gpu_only = match_size(index._hm, index._by_bit, {}, *args)
    # A speculative map with no entries takes the general walk and adds nothing of its own.
    general = match_size(index._hm, index._by_bit, {"nobody": {}}, *args)
    assert gpu_only == general
    assert gpu_only == index.match(MODEL, None, prompt)
    assert {r.blocks for r in gpu_only.values()} <= set(range(1, 17))
