"""`apply`'s inlined common store against `_store`, the general path: the same random streams,
once with list token ids (eligible for the fast path), once with tuples (never eligible).

The seed is in the test id: `pytest -k "seed-7"` replays a failure.
"""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest

from kvroute.core import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    SourceId,
    source_id,
)
from kvroute.index import IndexLimits, PrefixIndex

MODEL = "m"
BS = 4
# Twelve sources, so holder bits go past 256 (ints CPython does not cache): the fast path
# tells a new hash from one the source alone holds by identity, then by length.
SOURCES = [source_id(f"e{i // 2}", i % 2) for i in range(12)]


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def _stream(seed: int, steps: int) -> list[tuple[SourceId, list[Event]]]:
    rng = random.Random(seed)
    docs = [[rng.randrange(6) for _ in range(4 * BS)] for _ in range(4)]
    # Few engine hashes for many prefixes: duplicates, aliases (one prefix, two engine
    # hashes) and reuse (one engine hash, another prefix) all happen.
    out: list[tuple[SourceId, list[Event]]] = []
    for _ in range(steps):
        source = rng.choice(SOURCES)
        events: list[Event] = []
        for _ in range(rng.randint(1, 4)):
            roll = rng.random()
            if roll < 0.7:
                doc = rng.choice(docs)
                first = rng.choice([0, 0, 1, 2])
                n = rng.randint(1, 4 - first)
                # A falsy salt is still a salt to the fast path's check (`is None`): "" must
                # agree too; a salt on a continuation (a parent) seeds nothing.
                salt = rng.choice([None, None, None, "", "s1"])
                events.append(
                    BlockStored(
                        block_hashes=[rng.randrange(40) for _ in range(n)],
                        parent_block_hash=None if first == 0 else rng.randrange(40),
                        token_ids=doc[first * BS : (first + n) * BS],
                        block_size=BS,
                        medium=rng.choice([None, "GPU", "GPU", "CPU"]),
                        lora_name=rng.choice([None, None, None, "x"]),
                        group_idx=rng.choice([None, 0, 0, 1]),
                        cache_salt=salt,
                    )
                )
            elif roll < 0.75:  # misaligned: no size yet, an empty store, a short one
                bs = rng.choice([0, BS])
                events.append(
                    BlockStored(
                        block_hashes=[rng.randrange(40) for _ in range(rng.randint(0, 2))],
                        token_ids=[rng.randrange(6) for _ in range(rng.choice([0, BS - 1, BS]))],
                        block_size=bs,
                    )
                )
            elif roll < 0.95:
                events.append(
                    BlockRemoved(
                        block_hashes=[rng.randrange(40)], medium=rng.choice([None, "GPU", "CPU"])
                    )
                )
            else:
                events.append(AllBlocksCleared())
        out.append((source, events))
    return out


def _as_tuples(events: list[Event]) -> list[Event]:
    # Tuple token ids take the general path (`type(tokens) is list` fails); same meaning.
    return [
        msgspec.structs.replace(ev, token_ids=tuple(ev.token_ids))
        if isinstance(ev, BlockStored) and ev.token_ids is not None
        else ev
        for ev in events
    ]


def _state(index: PrefixIndex) -> dict[str, Any]:
    hm = index._hm
    return {
        "sources": {
            sid: (
                list(s.blocks.items()),  # in order: the eviction order must agree too
                dict(s.dups),
                dict(s.aliases),
                sorted(s.media),
            )
            for sid, s in index._sources.items()
        },
        "any": dict(hm.any),
        "nongpu": dict(hm.nongpu),
        "media": {m: dict(d) for m, d in hm.media.items() if d},
        "blocks_by_model": index.blocks_by_model(),
        "applied": dict(index.counters.applied),
        "dropped": dict(index.counters.dropped),
        "spec": {e: dict(d) for e, d in index._spec.by_engine.items()},
    }


@pytest.mark.parametrize(
    "limits",
    [IndexLimits(), IndexLimits(max_blocks_per_source=9, max_blocks_total=40)],
    ids=["unbounded", "capped"],
)
@pytest.mark.parametrize("seed", range(12), ids=lambda s: f"seed-{s}")
def test_fast_path_agrees_with_the_general_path(seed: int, limits: IndexLimits) -> None:
    fast, general = (PrefixIndex(limits, clock=Clock()) for _ in range(2))
    rng = random.Random(seed)
    for index in (fast, general):
        for s in SOURCES:
            index.add_source(s, engine=s.rpartition("/")[0], model=MODEL)
    for step, (source, events) in enumerate(_stream(seed, 300)):
        if rng.random() < 0.1:  # routed prompts: stores must confirm (pop) these entries
            prompt = [rng.randrange(6) for _ in range(3 * BS)]
            engine = source.rpartition("/")[0]
            for index in (fast, general):
                index.add_speculative(engine, MODEL, None, prompt)
        fast.apply(source, EventBatch(0.0, events))
        general.apply(source, EventBatch(0.0, _as_tuples(events)))
        assert _state(fast) == _state(general), f"seed {seed} step {step}"
