"""Deterministic KV-event batch streams for subscriber tests: chained stores and removals, as
vLLM sends them (what the publisher encodes)."""

from __future__ import annotations

import random

from kvroute.events import (
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEvent,
    VllmEventBatch,
)

BLOCK_SIZE = 16


class EngineStream:
    """Makes the batches one engine source would publish: every BlockStored chains from a block
    the engine holds (or from nothing), every BlockRemoved evicts a block it holds.

    `rank` fills `data_parallel_rank`; hashes start at `hash_base` so sources never collide.
    """

    def __init__(self, seed: int, *, rank: int | None = 0, hash_base: int = 1) -> None:
        self._rng = random.Random(seed)
        self._rank = rank
        self._next_hash = hash_base
        self._held: list[int] = []

    def _store(self, blocks: int) -> VllmBlockStored:
        rng = self._rng
        parent = rng.choice(self._held) if self._held and rng.random() < 0.7 else None
        hashes = list(range(self._next_hash, self._next_hash + blocks))
        self._next_hash += blocks
        self._held.extend(hashes)
        tokens = [rng.randrange(50_000) for _ in range(blocks * BLOCK_SIZE)]
        return VllmBlockStored(
            block_hashes=list(hashes),
            parent_block_hash=parent,
            token_ids=tokens,
            block_size=BLOCK_SIZE,
            medium="GPU",
        )

    def _remove(self) -> VllmBlockRemoved:
        victim = self._held.pop(self._rng.randrange(len(self._held)))
        return VllmBlockRemoved(block_hashes=[victim], medium="GPU")

    def batch(self, events: int = 3, *, ts: float = 0.0) -> VllmEventBatch:
        out: list[VllmEvent] = []
        for _ in range(events):
            if self._held and self._rng.random() < 0.15:
                out.append(self._remove())
            else:
                out.append(self._store(self._rng.randint(1, 4)))
        return VllmEventBatch(ts=ts, events=out, data_parallel_rank=self._rank)

    def clear(self) -> VllmEventBatch:
        self._held.clear()
        return VllmEventBatch(
            ts=0.0, events=[VllmAllBlocksCleared()], data_parallel_rank=self._rank
        )

    def batches(self, n: int, events: int = 3) -> list[VllmEventBatch]:
        return [self.batch(events) for _ in range(n)]
