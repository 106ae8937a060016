"""The ingest benchmarks' event stream: chained multi-block `BlockStored` events with a share of
`BlockRemoved`, shaped like a vLLM engine's, plus the ground truth to check an index against."""

# - Each store is `blocks_per_store` blocks of `block_size` real token ids; with probability
#   `chain_share` it continues a recent fully held store (its last block is the parent), so
#   prompts share prefixes and chains grow up to `max_depth` stores.
# - A removal evicts one *leaf* block: the last held block of a store no held store continues.
#   vLLM's LRU frees a request's blocks tail first, so a parent outlives its children; removing a
#   held parent would also make the two compared indexers differ by design (Dynamo's radix tree
#   drops the subtree, kvroute keeps the children's hashes), not by a fault.
# - Token ids are unique per block (its number is in the first two ids), so two different blocks
#   never hash alike in any indexer, chained (kvroute) or per block (Dynamo).
#
# Store `s` holds engine hashes `4s+1 … 4s+4` (for 4 blocks per store); the probes of the warm-up
# phase use hashes and token ids outside the workload's ranges.

from __future__ import annotations

import random
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from kvroute.events import (
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEvent,
    VllmEventBatch,
    encode_batch,
)

__all__ = [
    "ChainedWorkload",
    "PrefixSample",
    "encode_events",
    "group_payloads",
    "probe_event",
]

_VOCAB: Final = 131_072  # token ids stay below a real vocabulary's size (Llama 3: 128,256)
_PROBE_HASH_BASE: Final = 1 << 50
_PROBE_TOKEN: Final = _VOCAB + 7  # first token id of a probe: never produced by the workload


@dataclass(frozen=True)
class PrefixSample:
    """A prompt to query and the blocks a correct index matches for it at the end of the run."""

    kind: str  # "stored" (every block still held) or "removed" (some of its blocks evicted)
    token_ids: list[int]
    expected_blocks: int
    full_blocks: int  # blocks in the prompt


class ChainedWorkload:
    """A deterministic event stream (same seed and parameters, same events) and its final state."""

    def __init__(
        self,
        *,
        seed: int = 0,
        blocks_per_store: int = 4,
        block_size: int = 16,
        remove_share: float = 0.10,
        chain_share: float = 0.8,
        max_depth: int = 32,
        recent: int = 4096,
    ) -> None:
        if blocks_per_store < 1 or block_size < 2:
            raise ValueError(
                f"blocks_per_store >= 1 and block_size >= 2 expected, got "
                f"{blocks_per_store} and {block_size}"
            )
        if not 0.0 <= remove_share < 1.0:
            raise ValueError(f"remove_share: expected in [0, 1), got {remove_share}")
        self.blocks_per_store = blocks_per_store
        self.block_size = block_size
        self.remove_share = remove_share
        self.chain_share = chain_share
        self.max_depth = max_depth
        self._recent_cap = recent
        self._rng = random.Random(seed)
        self._cycle = list(range(_VOCAB)) + list(range(block_size))  # ids, wrapped around
        # per store: parent store (-1: a root), blocks still held, held stores continuing it, depth
        self._parent = array("q")
        self._held = bytearray()
        self._kids = array("l")
        self._depth = array("l")
        self._leaves: list[int] = []  # stores with held blocks that no held store continues
        self._leaf_pos: dict[int, int] = {}
        self._recent: list[int] = []
        self.stores = 0
        self.removes = 0
        self.blocks_stored = 0

    # --- the stream ----------------------------------------------------------------------------

    def events(self, n: int) -> list[VllmEvent]:
        """The next `n` events."""
        rng = self._rng
        out: list[VllmEvent] = []
        for _ in range(n):
            if self._leaves and rng.random() < self.remove_share:
                out.append(self._remove(rng))
            else:
                out.append(self._store(rng))
        return out

    def block_tokens(self, block: int) -> list[int]:
        """The token ids of workload block number `block` (engine hash `block + 1`): the block's
        number in the first two, then a run of ids that depends on it."""
        base = (block * 7919) % _VOCAB
        return [block % _VOCAB, block // _VOCAB, *self._cycle[base : base + self.block_size - 2]]

    def _store_tokens(self, store: int) -> list[int]:
        first = store * self.blocks_per_store
        cycle = self._cycle
        rest = self.block_size - 2
        out: list[int] = []
        for b in range(first, first + self.blocks_per_store):
            base = (b * 7919) % _VOCAB
            out.append(b % _VOCAB)
            out.append(b // _VOCAB)
            out += cycle[base : base + rest]
        return out

    def _hash(self, store: int, i: int) -> int:
        return store * self.blocks_per_store + i + 1

    def _store(self, rng: random.Random) -> VllmBlockStored:
        n = self.blocks_per_store
        s = self.stores
        parent = -1
        if self._recent and rng.random() < self.chain_share:
            p = self._recent[rng.randrange(len(self._recent))]
            if self._held[p] == n and self._depth[p] < self.max_depth:
                parent = p
        self._parent.append(parent)
        self._held.append(n)
        self._kids.append(0)
        self._depth.append(1 if parent < 0 else self._depth[parent] + 1)
        self._add_leaf(s)
        if parent >= 0:
            self._kids[parent] += 1
            if self._kids[parent] == 1:
                self._drop_leaf(parent)
        self._recent.append(s)
        if len(self._recent) > self._recent_cap:
            del self._recent[: self._recent_cap // 2]
        self.stores += 1
        self.blocks_stored += n
        return VllmBlockStored(
            block_hashes=[self._hash(s, i) for i in range(n)],
            parent_block_hash=None if parent < 0 else self._hash(parent, n - 1),
            token_ids=self._store_tokens(s),
            block_size=self.block_size,
            medium="GPU",
        )

    def _remove(self, rng: random.Random) -> VllmBlockRemoved:
        s = self._leaves[rng.randrange(len(self._leaves))]
        held = self._held[s] - 1
        self._held[s] = held
        if held == 0:
            self._drop_leaf(s)
            p = self._parent[s]
            if p >= 0:
                self._kids[p] -= 1
                if self._kids[p] == 0:
                    self._add_leaf(p)
        self.removes += 1
        return VllmBlockRemoved(block_hashes=[self._hash(s, held)], medium="GPU")

    def _add_leaf(self, s: int) -> None:
        self._leaf_pos[s] = len(self._leaves)
        self._leaves.append(s)

    def _drop_leaf(self, s: int) -> None:
        i = self._leaf_pos.pop(s)
        last = self._leaves.pop()
        if last != s:
            self._leaves[i] = last
            self._leaf_pos[last] = i

    # --- the ground truth ----------------------------------------------------------------------

    @property
    def blocks_held(self) -> int:
        return sum(self._held)

    def chain(self, store: int) -> list[int]:
        """The stores from the root to `store`."""
        out = [store]
        while (p := self._parent[out[-1]]) >= 0:
            out.append(p)
        out.reverse()
        return out

    def expected_blocks(self, store: int) -> int:
        """Blocks of `store`'s whole prompt (root to its last block) an exact index matches now:
        the leading held blocks."""
        n = self.blocks_per_store
        total = 0
        for s in self.chain(store):
            total += self._held[s]
            if self._held[s] < n:
                break
        return total

    def prompt(self, store: int) -> list[int]:
        """The token ids of `store`'s whole prompt."""
        out: list[int] = []
        for s in self.chain(store):
            out.extend(self._store_tokens(s))
        return out

    def samples(self, stored: int, removed: int, seed: int = 1) -> list[PrefixSample]:
        """`stored` prompts whose blocks are all held and `removed` prompts that lost some."""
        rng = random.Random(seed)
        n = self.blocks_per_store
        full = [s for s in range(self.stores) if self._held[s] == n]
        gone = [s for s in range(self.stores) if self._held[s] < n]
        out: list[PrefixSample] = []
        for kind, pool, k in (("stored", full, stored), ("removed", gone, removed)):
            for s in rng.sample(pool, min(k, len(pool))):
                depth = len(self.chain(s))
                out.append(PrefixSample(kind, self.prompt(s), self.expected_blocks(s), depth * n))
        return out


def probe_event(k: int, block_size: int) -> VllmBlockStored:
    """Warm-up probe number `k`: a one-block root store outside the workload's hashes and ids."""
    tokens = [_PROBE_TOKEN, k % _VOCAB, k // _VOCAB] + [_PROBE_TOKEN] * (block_size - 3)
    return VllmBlockStored(
        block_hashes=[_PROBE_HASH_BASE + k],
        parent_block_hash=None,
        token_ids=tokens[:block_size],
        block_size=block_size,
        medium="GPU",
    )


# --- payloads ------------------------------------------------------------------------------------

_RAW_BATCH: Final = msgspec.msgpack.Decoder(tuple[float, list[msgspec.Raw], Any])


def encode_events(workload: ChainedWorkload, n: int, *, chunk: int = 1000) -> list[bytes]:
    """The workload's next `n` events, each as its msgpack bytes in vLLM 0.33's map shape (cut
    out of `encode_batch` output, so the bytes are the publisher's own)."""
    out: list[bytes] = []
    while len(out) < n:
        events = workload.events(min(chunk, n - len(out)))
        _ts, raws, _rank = _RAW_BATCH.decode(encode_batch(VllmEventBatch(ts=0.0, events=events)))
        out.extend(bytes(r) for r in raws)
    return out


def group_payloads(events: Sequence[bytes], per_message: int, ts: float = 1.0) -> list[bytes]:
    """`events` (from `encode_events`) as batches of `per_message`: exactly the payloads
    `encode_batch(VllmEventBatch(ts, those events))` returns, built without re-encoding."""
    if not 1 <= per_message <= 0xFFFF:
        raise ValueError(f"per_message: expected 1 to 65535, got {per_message}")
    head = b"\x93\xcb" + struct.pack(">d", ts)  # [ts, events, data_parallel_rank=nil]
    out = []
    for i in range(0, len(events), per_message):
        part = events[i : i + per_message]
        n = len(part)
        count = bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
        out.append(b"".join((head, count, *part, b"\xc0")))
    return out
