"""Holder bitmasks of the index: local hash -> bits of the sources holding it, per medium, and the
per-source state those bits stand for (`SourceState`)."""

from __future__ import annotations

from typing import Any, TypeAlias

from kvroute.core import GPU, SourceId

__all__ = ["Holders", "Key", "SourceState"]

# A source's block key: the engine hash itself for GPU copies (the common case, no extra
# object), `(medium, engine hash)` for copies in other media (CPU offload, LMCache, ...).
Key: TypeAlias = Any


class SourceState:
    """Everything one engine source (engine, DP rank) holds. Plain dicts of ints only."""

    __slots__ = (
        "aliases",
        "bit",
        "blocks",
        "dups",
        "engine",
        "last_lora",
        "last_size",
        "media",
        "model",
        "partitions",
        "seeds",
        "sid",
        "stale",
    )

    def __init__(self, sid: SourceId, engine: str, model: str, bit: int) -> None:
        self.sid = sid
        self.engine = engine
        self.model = model
        self.bit = bit  # a single set bit: this source's place in every holder mask
        self.stale = False
        # key -> local hash; insertion order is store order (a re-store moves a key to the
        # end), so the first keys are the least recently stored: the eviction order.
        self.blocks: dict[Key, int] = {}
        self.dups: dict[Key, int] = {}  # key -> stores beyond the first (refcount - 1)
        # (medium, local) -> keys beyond the first that map to that local hash in that medium
        # (two engine hashes for one prefix, e.g. hash inputs we ignore); almost always empty.
        self.aliases: dict[tuple[str, int], int] = {}
        self.media: set[str] = set()  # non-GPU media stored since the last reset
        self.partitions: set[tuple[str | None, int]] = set()  # (lora, block size) seen
        self.last_lora: str | None = None  # the partition of the last store: a cheap check
        self.last_size = 0
        self.seeds: dict[str | None, int] = {}  # lora -> seed (no cache salt): a cheap lookup


class Holders:
    """Local hash -> holder bits, kept consistent with every source's keys.

    `any`: bits of the sources holding the hash in any medium (what `match` walks);
    `nongpu`: bits of those holding it, but not on GPU (usually empty); `media`: per non-GPU
    medium, bits holding it there; `model_blocks`: distinct hashes held per model.
    """

    __slots__ = ("any", "media", "model_blocks", "nongpu")

    def __init__(self) -> None:
        self.any: dict[int, int] = {}
        self.nongpu: dict[int, int] = {}
        self.media: dict[str, dict[int, int]] = {}
        self.model_blocks: dict[str, int] = {}

    def hold_again_gpu(self, src: SourceState, local: int) -> None:
        # The source already holds `local`: in other media only, or on GPU under another key.
        bit = src.bit
        ng = self.nongpu.get(local, 0)
        if ng & bit:
            if ng ^ bit:
                self.nongpu[local] = ng ^ bit
            else:
                del self.nongpu[local]
        else:
            akey = (GPU, local)
            src.aliases[akey] = src.aliases.get(akey, 0) + 1

    def hold_other(self, src: SourceState, medium: str, local: int) -> None:
        bit = src.bit
        per_medium = self.media.setdefault(medium, {})
        mm = per_medium.get(local, 0)
        if mm & bit:
            akey = (medium, local)
            src.aliases[akey] = src.aliases.get(akey, 0) + 1
            return
        per_medium[local] = mm | bit
        m = self.any.get(local, 0)
        if not m & bit:  # held nowhere by this source until now: not on GPU
            self.any[local] = m | bit
            if not m:
                self.model_blocks[src.model] = self.model_blocks.get(src.model, 0) + 1
            self.nongpu[local] = self.nongpu.get(local, 0) | bit

    def release(self, src: SourceState, medium: str, local: int) -> None:
        """One key of `src` mapping to `local` in `medium` is gone: update the holder masks."""
        if src.aliases:
            akey = (medium, local)
            n = src.aliases.get(akey)
            if n is not None:  # another key still maps to it in this medium
                if n > 1:
                    src.aliases[akey] = n - 1
                else:
                    del src.aliases[akey]
                return
        bit = src.bit
        if medium == GPU:
            if src.media and any(
                self.media[m].get(local, 0) & bit for m in src.media
            ):  # still held in another medium
                self.nongpu[local] = self.nongpu.get(local, 0) | bit
                return
        else:
            per_medium = self.media[medium]
            rest = per_medium[local] & ~bit
            if rest:
                per_medium[local] = rest
            else:
                del per_medium[local]
            ng = self.nongpu.get(local, 0)
            if not ng & bit:
                return  # still on GPU
            if any(self.media[m].get(local, 0) & bit for m in src.media):
                return  # still in another non-GPU medium
            if ng ^ bit:
                self.nongpu[local] = ng ^ bit
            else:
                del self.nongpu[local]
        m = self.any[local] & ~bit
        if m:
            self.any[local] = m
        else:
            del self.any[local]
            self.model_blocks[src.model] -= 1

    def count_best_medium(self, local: int, bits: int, counts: dict[int, dict[str, int]]) -> None:
        # Sources in `bits` hold `local` but not on GPU: credit their best other medium.
        media = sorted(self.media, key=lambda m: (m != "CPU", m))
        while bits:
            low = bits & -bits
            bits ^= low
            for medium in media:
                if self.media[medium].get(local, 0) & low:
                    per = counts.setdefault(low, {})
                    per[medium] = per.get(medium, 0) + 1
                    break
