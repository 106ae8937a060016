"""The native index against its reference model: seeded random streams through both, every
observable result compared after every batch (docs/design.md §12).

Streams mix what engines really send (chained stores, removes, clears) with every unusual path:
orphans, duplicates, hash reuse, LoRA adapters, cache salts, other media, a second block size,
the wrong KV group, bytes hashes, bad tokens, caps, source resets and removals, stale flags,
speculative entries and, in some seeds, more than 64 sources (holder masks past bit 63). The
seed is in the test id: `pytest -k "seed-17"` replays a failure.
"""

from __future__ import annotations

import os
import random
from typing import Any

import msgspec
import pytest

from kvroute.core import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    EventCounters,
    SourceId,
    source_id,
)
from kvroute.index import IndexLimits, PrefixIndex
from kvroute.index.impl import native_error

pytestmark = pytest.mark.skipif(
    native_error() is not None, reason=f"native index core not built: {native_error()}"
)

MODEL = "m"
SIZES = (4, 8)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Stream:
    """A random but engine-like workload over a few shared-prefix documents."""

    def __init__(self, seed: int, sources: int, odd: float) -> None:
        self.rng = random.Random(seed)
        self.odd = odd  # how often the unusual paths come up: 1 often, 0.1 rarely
        rng = self.rng
        trunk = [rng.randrange(40) for _ in range(16)]
        self.docs = [trunk + [rng.randrange(40) for _ in range(32)] for _ in range(4)]
        self.docs.append([rng.randrange(40) for _ in range(40)])
        self.sources = [source_id(f"e{i // 2}", i % 2) for i in range(sources)]
        # Per source: document -> engine hashes of the blocks stored so far (one block size).
        self.chains: dict[SourceId, dict[int, list[Any]]] = {s: {} for s in self.sources}
        self.held: dict[SourceId, list[Any]] = {s: [] for s in self.sources}
        self.size: dict[SourceId, int] = {s: SIZES[i % 7 == 6] for i, s in enumerate(self.sources)}

    def engine_hash(self, source: SourceId) -> Any:
        rng = self.rng
        odd = self.odd
        if rng.random() < 0.03 * odd:
            return rng.randbytes(rng.choice((2, 16)))  # bytes hashes (vLLM's non-int mode)
        if rng.random() < 0.03 * odd:
            return rng.randrange(-(2**63), 0)  # a signed hash
        if rng.random() < 0.02 * odd and self.held[source]:
            return rng.choice(self.held[source])  # hash reuse for another prefix
        return rng.getrandbits(64)

    def stored(self, source: SourceId) -> BlockStored:
        rng = self.rng
        size = self.size[source]
        doc_i = rng.randrange(len(self.docs))
        doc = self.docs[doc_i]
        chain = self.chains[source].setdefault(doc_i, [])
        have = len(chain)
        if have * size >= len(doc) or rng.random() < 0.1:
            have = rng.randrange(0, max(1, min(have, len(doc) // size)))  # a re-store
            del chain[have:]
        n = rng.randint(1, 3)
        n = max(1, min(n, len(doc) // size - have))
        tokens = doc[have * size : (have + n) * size]
        parent = chain[have - 1] if have else None
        hashes = [self.engine_hash(source) for _ in range(n)]
        if rng.random() < 0.05 and chain:  # a duplicate store of a block already held
            hashes = chain[have : have + n] or hashes
        chain[have:] = hashes
        self.held[source].extend(hashes)
        odd = self.odd
        medium = rng.choices([None, "GPU", "CPU", "DISK"], [60, 20, 12 * odd, 8 * odd])[0]
        lora = rng.choices([None, "x"], [90, 10 * odd])[0]
        salt = rng.choices([None, "s"], [95, 5 * odd])[0]
        group = rng.choices([None, 0, 1], [60, 37, 3 * odd])[0]
        bs: int | None = size
        r = rng.random() / odd
        if r < 0.03:
            parent = rng.getrandbits(64)  # an orphan
        elif r < 0.05:
            tokens = [*tokens, 1]  # misaligned
        elif r < 0.06:
            tokens = [2**33, *tokens[1:]]  # not a uint32
        elif r < 0.07:
            bs = None
        return BlockStored(hashes, parent, list(tokens), bs, lora, medium, group, salt)

    def removed(self, source: SourceId) -> BlockRemoved:
        rng = self.rng
        held = self.held[source]
        hashes = [
            rng.choice(held) if held and rng.random() < 0.9 else rng.getrandbits(64)
            for _ in range(rng.randint(0, 2))
        ]
        odd = self.odd
        medium = rng.choices([None, "GPU", "CPU", "DISK"], [60, 20, 12 * odd, 8 * odd])[0]
        return BlockRemoved(hashes, medium, rng.choices([None, 0, 1], [70, 27, 3 * odd])[0])

    def batch(self, source: SourceId) -> EventBatch:
        rng = self.rng
        events: list[Any] = []
        for _ in range(rng.choice((1, 1, 2, 5))):
            r = rng.random()
            if r < 0.7:
                events.append(self.stored(source))
            elif r < 0.97:
                events.append(self.removed(source))
            else:
                events.append(AllBlocksCleared())
                self.chains[source].clear()
        return EventBatch(0.0, events)

    def prompt(self) -> list[int]:
        rng = self.rng
        doc = rng.choice(self.docs)
        cut = rng.randrange(len(doc) + 1)
        tail = [rng.randrange(40) for _ in range(rng.choice((0, 0, 3, 9)))]
        return doc[:cut] + tail


def with_raw_tokens(batch: EventBatch, rng: random.Random) -> EventBatch:
    """`batch` with the token ids of about half its stores as the msgpack bytes of the list."""
    events = [
        msgspec.structs.replace(e, token_ids=msgspec.Raw(msgspec.msgpack.encode(e.token_ids)))
        if isinstance(e, BlockStored) and rng.random() < 0.5
        else e
        for e in batch.events
    ]
    return msgspec.structs.replace(batch, events=events)


def observe(index: PrefixIndex, stream: Stream, prompts: list[list[int]]) -> dict[str, Any]:
    counters = index.counters
    out: dict[str, Any] = {
        "applied": dict(counters.applied),
        "dropped": dict(counters.dropped),
        "by_model": index.blocks_by_model(),
        "sizes": index.block_sizes(MODEL),
        "stale": index.stale_engines(),
    }
    for s in stream.sources:
        out[f"holdings {s}"] = index.holdings(s)
        out[f"count {s}"] = index.source_block_count(s)
        out[f"stale {s}"] = index.is_stale(s)
    for i, p in enumerate(prompts):
        for lora, salt in ((None, None), ("x", None), (None, "s")):
            try:
                out[f"match {i} {lora} {salt}"] = index.match(MODEL, lora, p, cache_salt=salt)
            except Exception as exc:
                out[f"match {i} {lora} {salt}"] = type(exc).__name__
    return out


def run(seed: int, steps: int, sources: int, limits: IndexLimits, odd: float = 1.0) -> None:
    from kvroute.index.native_index import NativePrefixIndex

    stream = Stream(seed, sources, odd)
    rng = stream.rng
    clock = Clock()
    ref = PrefixIndex(limits, counters=EventCounters(), clock=clock)
    nat = NativePrefixIndex(limits, counters=EventCounters(), clock=clock)
    if seed % 3 == 0:  # cleared sources drain from the holder masks over the next batches
        nat.drain_min = 0
        nat.drain_per_batch = 2
    both: list[PrefixIndex] = [ref, nat]
    for s in stream.sources:
        for ix in both:
            ix.add_source(s, engine=s.rpartition("/")[0], model=MODEL)
    for step in range(steps):
        source = rng.choice(stream.sources)
        engine = source.rpartition("/")[0]
        r = rng.random()
        what: str
        if r < 0.85:
            batch = stream.batch(source)
            what = f"apply {source} {batch}"
            ref.apply(source, batch)
            # The native index also takes token ids as msgpack bytes (events/wire.py raw mode),
            # including nil and ints past uint32 that the decoder would have listed.
            nat.apply(source, with_raw_tokens(batch, rng))
        elif r < 0.88:
            what = f"reset {source}"
            for ix in both:
                ix.reset_source(source)
            stream.chains[source].clear()
        elif r < 0.91:
            stale = rng.random() < 0.5
            what = f"stale {source} {stale}"
            for ix in both:
                ix.set_stale(source, stale)
        elif r < 0.93:
            what = f"re-add {source}"
            for ix in both:
                ix.remove_source(source)
                ix.add_source(source, engine=engine, model=MODEL)
            stream.chains[source].clear()
        elif r < 0.96:
            prompt = stream.prompt()
            what = f"speculative {engine}"
            for ix in both:
                ix.add_speculative(engine, MODEL, None, prompt)
        else:
            clock.now += rng.choice((0.5, 3.0))
            what = f"clock {clock.now}"
        prompts = [stream.prompt() for _ in range(3)]
        want = observe(ref, stream, prompts)
        got = observe(nat, stream, prompts)
        if got != want:
            diff = {k: (want[k], got.get(k)) for k in want if want[k] != got.get(k)}
            pytest.fail(f"seed {seed} step {step} after {what}:\n(reference, native) = {diff}")


SMALL = IndexLimits(max_blocks_per_source=10, max_blocks_total=30, speculative_ttl_s=2.0)
ROOMY = IndexLimits(speculative_ttl_s=2.0)


# `make test-native-asan` runs more seeds (KVROUTE_DIFFERENTIAL_SEEDS) under the sanitizers.
SEEDS = int(os.environ.get("KVROUTE_DIFFERENTIAL_SEEDS", "40"))


@pytest.mark.parametrize("seed", range(SEEDS), ids=lambda s: f"seed-{s}")
def test_native_matches_reference(seed: int) -> None:
    # Half the seeds are engine-like (unusual paths rare, so the C loops run most events),
    # half are wild; each half with a tiny cap and without.
    run(seed, steps=250, sources=4, limits=(ROOMY, SMALL)[seed % 2], odd=(0.05, 1.0)[seed // 2 % 2])


@pytest.mark.parametrize("seed", range(3), ids=lambda s: f"seed-{s}")
def test_native_matches_reference_past_64_sources(seed: int) -> None:
    run(1000 + seed, steps=300, sources=70, limits=SMALL if seed % 2 else ROOMY)
