"""The simulated GPU block pool of one engine DP rank: prefix caching with chained block hashes,
LRU eviction of free cached blocks, and the KV events vLLM would emit for each change."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from kvroute.core import EngineHash
from kvroute.events.vllm_events import (
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEvent,
)

__all__ = ["NONE_DIGEST", "BlockPool", "CachedBlock", "block_digest"]

NONE_DIGEST = hashlib.sha256(b"kvroute-sim-none-hash").digest()
"""Parent digest of block 0 (vLLM ≥0.29 uses a fixed seed too, so every engine agrees)."""

_U64 = (1 << 64) - 1


def block_digest(parent: bytes, token_ids: Sequence[int], lora_name: str | None) -> bytes:
    """sha256 over the parent digest, the token ids (4-byte big-endian) and the LoRA name."""
    h = hashlib.sha256(parent)
    h.update(b"".join(t.to_bytes(4, "big", signed=False) for t in token_ids))
    if lora_name is not None:
        h.update(b"\x00lora\x00" + lora_name.encode())
    return h.digest()


@dataclass(frozen=True, slots=True)
class CachedBlock:
    """One cached block as the pool itself holds it (ground truth for /sim/state)."""

    block_id: int
    hash: EngineHash
    parent: EngineHash | None
    lora_name: str | None
    medium: str = "GPU"


class _Block:
    __slots__ = ("block_id", "digest", "lora_name", "parent", "ref_count")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.digest: bytes | None = None
        self.parent: bytes | None = None
        self.lora_name: str | None = None


class BlockPool:
    """`num_blocks` blocks of `block_size` tokens, with vLLM's prefix-caching rules.

    - A block is *cached* when it holds a hash. As in vLLM, one hash may live in several
      physical blocks (two requests computed the same block); each copy is announced by its
      own BlockStored and its eviction by its own BlockRemoved.
    - Free blocks (ref count 0) sit in an LRU queue; cached free blocks stay cached until
      `allocate` takes them from the head of the queue, which evicts them (BlockRemoved).
    - Freeing appends at the tail, so callers free a request's blocks last-block-first: the
      tail of a prompt is evicted before its head, as in vLLM.
    - Events accumulate in order until `drain_events()` (one scheduler step).
    """

    def __init__(self, num_blocks: int, block_size: int, *, bytes_hashes: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks: expected >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size: expected >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.bytes_hashes = bytes_hashes
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, dict[int, None]] = {}  # digest -> block ids (copies)
        self._events: list[VllmEvent] = []

    # -- hashes --------------------------------------------------------------------------------
    def external(self, digest: bytes) -> EngineHash:
        """The hash as events carry it: low 64 bits as uint64, or the 32 raw bytes."""
        if self.bytes_hashes:
            return digest
        return int.from_bytes(digest, "big") & _U64

    def chain_digests(
        self,
        token_ids: Sequence[int],
        lora_name: str | None,
        *,
        parent: bytes = NONE_DIGEST,
    ) -> list[bytes]:
        """Digests of the full blocks of `token_ids`, chained from `parent` (the digest of the
        block before token_ids[0], NONE_DIGEST at token 0)."""
        bs = self.block_size
        out = []
        for i in range(len(token_ids) // bs):
            parent = block_digest(parent, token_ids[i * bs : (i + 1) * bs], lora_name)
            out.append(parent)
        return out

    # -- state ---------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks with ref count 0 (cached or not): what `allocate` can hand out."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Distinct cached hashes."""
        return len(self._cached)

    @property
    def pending_events(self) -> int:
        """Events made but not yet drained by a step (e.g. a reset on an idle engine)."""
        return len(self._events)

    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def is_cached(self, digest: bytes) -> bool:
        return digest in self._cached

    def cached_prefix(self, digests: Sequence[bytes]) -> int:
        """How many leading digests are cached."""
        n = 0
        for d in digests:
            if d not in self._cached:
                break
            n += 1
        return n

    def _pick(self, digest: bytes) -> int:
        """The copy a prefix hit uses: one already in use if any, else the first."""
        copies = self._cached[digest]
        for bid in copies:
            if self._blocks[bid].ref_count > 0:
                return bid
        return next(iter(copies))

    def free_among(self, digests: Sequence[bytes]) -> int:
        """How many free blocks a `touch(digests)` would take out of the free queue."""
        return sum(1 for d in digests if self._blocks[self._pick(d)].ref_count == 0)

    def cached_blocks(self) -> list[CachedBlock]:
        """Every cached physical block, read from the pool itself (a hash may repeat)."""
        out = []
        for digest, copies in self._cached.items():
            for bid in copies:
                blk = self._blocks[bid]
                parent = None if blk.parent is None else self.external(blk.parent)
                out.append(CachedBlock(bid, self.external(digest), parent, blk.lora_name))
        return out

    # -- operations ----------------------------------------------------------------------------
    def touch(self, digests: Sequence[bytes]) -> list[int]:
        """Take a reference on the cached blocks of `digests` (a prefix hit); their block ids."""
        ids = []
        for d in digests:
            bid = self._pick(d)
            blk = self._blocks[bid]
            if blk.ref_count == 0:
                del self._free[bid]
            blk.ref_count += 1
            ids.append(bid)
        return ids

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks from the head of the free queue, evicting the cached ones."""
        if n > len(self._free):
            raise ValueError(f"allocate: {n} blocks wanted, {len(self._free)} free")
        ids = []
        for _ in range(n):
            bid, _ = self._free.popitem(last=False)
            blk = self._blocks[bid]
            if blk.digest is not None:
                copies = self._cached[blk.digest]
                del copies[bid]
                if not copies:
                    del self._cached[blk.digest]
                self._events.append(VllmBlockRemoved([self.external(blk.digest)], "GPU", 0))
                blk.digest = blk.parent = blk.lora_name = None
            blk.ref_count = 1
            ids.append(bid)
        return ids

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block, in the given order (freed blocks join the tail)."""
        for bid in block_ids:
            blk = self._blocks[bid]
            if blk.ref_count <= 0:
                raise ValueError(f"free: block {bid} is not in use")
            blk.ref_count -= 1
            if blk.ref_count == 0:
                self._free[bid] = None

    def cache(
        self,
        block_ids: Sequence[int],
        digests: Sequence[bytes],
        parent: bytes | None,
        token_ids: Sequence[int],
        *,
        lora_name: str | None = None,
        lora_id: int | None = None,
    ) -> None:
        """Enter newly full blocks (`digests[i]` in `block_ids[i]`) into the cache and announce
        them in one BlockStored (a hash already cached elsewhere becomes one more copy).

        `parent` is the digest of the block before the first one (None at token 0);
        `token_ids` are the tokens of exactly these blocks.
        """
        hashes: list[EngineHash] = []
        prev = parent
        for bid, digest in zip(block_ids, digests, strict=True):
            blk = self._blocks[bid]
            if blk.digest is not None:
                raise ValueError(f"cache: block {bid} already holds a hash")
            blk.digest, blk.parent, blk.lora_name = digest, prev, lora_name
            self._cached.setdefault(digest, {})[bid] = None
            hashes.append(self.external(digest))
            prev = digest
        self._flush_run(hashes, list(token_ids), parent, lora_name, lora_id)

    def _flush_run(
        self,
        hashes: list[EngineHash],
        tokens: list[int],
        parent: bytes | None,
        lora_name: str | None,
        lora_id: int | None,
    ) -> None:
        if not hashes:
            return
        self._events.append(
            VllmBlockStored(
                block_hashes=hashes,
                parent_block_hash=None if parent is None else self.external(parent),
                token_ids=tokens,
                block_size=self.block_size,
                lora_id=lora_id,
                medium="GPU",
                lora_name=lora_name,
                group_idx=0,
            )
        )

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (AllBlocksCleared); refused while any block is in use."""
        if self.num_used:
            return False
        for blk in self._blocks:
            blk.digest = blk.parent = blk.lora_name = None
        self._cached.clear()
        self._events.append(VllmAllBlocksCleared())
        return True

    def drain_events(self) -> list[VllmEvent]:
        events, self._events = self._events, []
        return events
