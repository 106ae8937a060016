"""The sync prefix index: per source engine hash → local hash, per local hash a bitmask of holders,
in plain dicts of ints (no per-block objects, nothing for the GC to track); see `PrefixIndex`."""

from __future__ import annotations

import sys
import time
from array import array
from collections.abc import Callable, Sequence
from itertools import islice
from typing import ClassVar

from xxhash import xxh3_64_intdigest

from kvroute.core import (
    GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DropReason,
    EventBatch,
    EventCounters,
    LocalHash,
    MatchResult,
    SourceId,
)
from kvroute.errors import IndexStateError
from kvroute.index.export import SourceExport, pairs_of
from kvroute.index.hashing import SWAP_BYTES as _SWAP
from kvroute.index.hashing import chain_hashes, seed_hash
from kvroute.index.holders import Holders, Key, SourceState
from kvroute.index.limits import IndexLimits
from kvroute.index.matching import match_sizes
from kvroute.index.speculative import SpeculativeEntries

__all__ = ["PrefixIndex"]

_BIG_ENDIAN_HOST = sys.byteorder == "big"  # snapshot pairs are little-endian


_NO_CAP = 1 << 62  # a block cap of 0 means none
_STORED = "BlockStored"
_REMOVED = "BlockRemoved"
_CLEARED = "AllBlocksCleared"


class PrefixIndex:
    """Which engine source holds which prompt prefix, from KV events; answers `match()`.

    Synchronous and lock-free by design: call it from one thread (the event loop). Local hashes
    are seeded by (model, LoRA, cache salt) and chained over blocks of one size, so the one
    holder map is partitioned by (model, LoRA, block size) by construction; `_parts` records
    which sources hold blocks of each partition. Holders are bitmasks (one bit per source).

    Staleness is decided by the caller (events/tracker.py, its single owner): `set_stale` marks a
    source whose blocks must not count in `match`; nothing in the index changes it by itself.
    """

    # What one (block, source) entry costs, for the byte budget (`IndexLimits.max_index_bytes`):
    # the RSS growth per entry `kvroute bench memory` measures for this implementation with one
    # source (146-163 B at 10^6..10^7 blocks), rounded up; shared blocks cost less.
    entry_bytes: ClassVar[int] = 160
    impl: ClassVar[str] = "python"  # the `kvroute_index_info{impl}` label
    # Whether `apply` takes stores whose `token_ids` are the msgpack bytes of the array
    # (events/wire.py `BatchDecoder(raw_tokens=True)`); the reference reads them as ints.
    raw_tokens: ClassVar[bool] = False

    def __init__(
        self,
        limits: IndexLimits | None = None,
        *,
        counters: EventCounters | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits if limits is not None else IndexLimits()
        self.counters = counters if counters is not None else EventCounters()
        self._clock = clock
        self._indexed_group = self.limits.indexed_group
        self._seeds: dict[tuple[str, str | None, str | None], int] = {}
        self._sources: dict[SourceId, SourceState] = {}
        self._by_bit: dict[int, SourceState] = {}
        self._free_bits: list[int] = []
        self._next_bit = 1
        self._stale_bits = 0
        self._stale_engines: frozenset[str] = frozenset()
        self._model_bits: dict[str, int] = {}  # model -> bits of its sources
        self._hm = Holders()
        # Aliases of the holder dicts (never rebound) for the hot paths.
        self._holders = self._hm.any
        self._nongpu = self._hm.nongpu
        self._model_blocks = self._hm.model_blocks
        self._parts: dict[tuple[str, str | None], dict[int, int]] = {}  # -> block size -> bits
        self._total = 0  # sum of len(source.blocks)
        lim = self.limits
        self._block_cap = lim.max_blocks_per_source or _NO_CAP
        by_bytes = lim.max_index_bytes // self.entry_bytes
        self._total_cap = min(lim.max_blocks_total or _NO_CAP, by_bytes)
        self._spec = SpeculativeEntries(
            self.limits.speculative_ttl_s, self.limits.max_speculative_per_engine, clock
        )
        self._spec_by_engine = self._spec.by_engine  # alias for the hot path

    # --- sources ------------------------------------------------------------------------------

    def add_source(self, source: SourceId, *, engine: str, model: str) -> None:
        """Register a source; idempotent for the same engine and model."""
        src = self._sources.get(source)
        if src is not None:
            if src.engine != engine or src.model != model:
                raise IndexStateError(
                    f"source {source}: already added as engine {src.engine!r} model "
                    f"{src.model!r}, got engine {engine!r} model {model!r}; remove it first"
                )
            return
        if self._free_bits:
            bit = self._free_bits.pop()
        else:
            bit = self._next_bit
            self._next_bit <<= 1
        src = SourceState(source, engine, model, bit)
        self._sources[source] = src
        self._by_bit[bit] = src
        self._model_bits[model] = self._model_bits.get(model, 0) | bit
        self._model_blocks.setdefault(model, 0)

    def remove_source(self, source: SourceId) -> None:
        """Forget a source and everything it held; a no-op for unknown sources."""
        src = self._sources.pop(source, None)
        if src is None:
            return
        self._total -= len(src.blocks)
        self._clear_source(src)
        bit = src.bit
        del self._by_bit[bit]
        if src.stale:
            self._set_stale(src, False)
        rest = self._model_bits[src.model] & ~bit
        if rest:
            self._model_bits[src.model] = rest
        else:
            del self._model_bits[src.model]
        self._free_bits.append(bit)

    def reset_source(self, source: SourceId) -> None:
        """Drop everything the source held (engine restart, disconnect); its stale flag is left as
        the caller set it. A no-op for unknown sources."""
        src = self._sources.get(source)
        if src is not None:
            self._total -= len(src.blocks)
            self._clear_source(src)

    def set_stale(self, source: SourceId, stale: bool) -> None:
        """Mark a source stale (its blocks stop counting in `match`) or consistent again."""
        src = self._sources.get(source)
        if src is not None:
            self._set_stale(src, stale)

    def is_stale(self, source: SourceId) -> bool:
        src = self._sources.get(source)
        return src is not None and src.stale

    def stale_engines(self) -> frozenset[str]:
        """Engines with at least one stale source (kept current by `set_stale`: no work here)."""
        return self._stale_engines

    def _set_stale(self, src: SourceState, stale: bool) -> None:
        if src.stale == stale:
            return
        src.stale = stale
        if stale:
            self._stale_bits |= src.bit
        else:
            self._stale_bits &= ~src.bit
        self._stale_engines = frozenset(
            s.engine for s in self._by_bit.values() if s.bit & self._stale_bits
        )

    # --- events -------------------------------------------------------------------------------

    def apply(self, source: SourceId, batch: EventBatch) -> None:
        """Apply one batch of a source's events in order; bad events are counted, never raised."""
        src = self._sources.get(source)
        counters = self.counters
        if src is None:
            counters.drop(source, DropReason.UNKNOWN_SOURCE, len(batch.events))
            return
        blocks = src.blocks
        before = len(blocks)
        cap = self._block_cap
        stored = removed = new = 0
        # The common store (GPU, no extra keys but Nones, the indexed group, the partition of the
        # source's last store, a known parent) is inlined below, over these locals; any other
        # goes through `_store`, which holds every rule.
        holders = self._holders
        hset = holders.setdefault
        bit = src.bit
        spec = self._spec_by_engine.get(src.engine)  # apply never adds entries
        group0 = self._indexed_group
        for ev in batch.events:
            if isinstance(ev, BlockStored):  # decoders may hand a subclass (events/wire.py)
                tokens = ev.token_ids
                bs = ev.block_size
                medium = ev.medium
                group = ev.group_idx
                if (
                    bs == src.last_size
                    and type(tokens) is list
                    and (medium is None or medium == GPU)
                    and (group is None or group == group0)
                    and ev.cache_salt is None
                    and ev.lora_name == src.last_lora
                ):
                    hashes = ev.block_hashes
                    n = len(hashes)
                    parent = ev.parent_block_hash
                    start = src.seeds.get(ev.lora_name) if parent is None else blocks.get(parent)
                    # Non-empty tokens of n * bs: also n > 0 and bs > 0 (last_size starts at 0).
                    if tokens and start is not None and len(tokens) == n * bs:
                        packed = array("I")
                        try:
                            packed.fromlist(tokens)  # a third faster than array("I", tokens)
                        except (OverflowError, TypeError):
                            n = 0  # _store counts it
                        if type(bs) is not int:
                            n = 0  # a hand-built event; _store decides (range() needs ints)
                        if _SWAP:
                            packed.byteswap()
                        # `hset(local, bit)` returns `bit` itself for a new hash, or for one this
                        # source alone holds already: the length of `holders` tells them apart.
                        nh = len(holders)
                        if n == 1:
                            # One block (the AIBrix shape): the loop body below, unrolled.
                            local = xxh3_64_intdigest(packed, start)
                            eh = hashes[0]
                            if spec:
                                spec.pop(local, None)
                            if eh in blocks:
                                new += self._store_again_gpu(src, eh, local)
                            else:
                                blocks[eh] = local
                                m = hset(local, bit)
                                if m is bit and len(holders) > nh:  # a new hash
                                    new += 1
                                elif not m & bit:  # a new holder
                                    holders[local] = m | bit
                                else:
                                    self._hm.hold_again_gpu(src, local)
                        elif n:
                            data = packed.tobytes()
                            step = bs * 4
                            h = start
                            # Each block's hash chains from the previous one, so the holder
                            # updates follow it in the same loop.
                            for eh, off in zip(hashes, range(0, n * step, step), strict=True):
                                h = local = xxh3_64_intdigest(data[off : off + step], h)
                                if spec:
                                    spec.pop(local, None)
                                if eh in blocks:
                                    new += self._store_again_gpu(src, eh, local)
                                    nh = len(holders)
                                    continue
                                blocks[eh] = local
                                m = hset(local, bit)
                                if m is bit and len(holders) > nh:  # a new hash
                                    nh += 1
                                    new += 1
                                elif not m & bit:  # a new holder
                                    holders[local] = m | bit
                                else:
                                    self._hm.hold_again_gpu(src, local)
                        if n:
                            stored += 1
                            if len(blocks) > cap:
                                self._evict(src, len(blocks) - cap + (cap >> 8))
                            continue
                if self._store(src, ev):
                    stored += 1
                    if len(blocks) > cap:
                        self._evict(src, len(blocks) - cap + (cap >> 8))
                continue
            kind = type(ev)
            if kind is BlockRemoved:
                if self._remove(src, ev):  # type: ignore[arg-type]
                    removed += 1
            elif kind is AllBlocksCleared:
                self._clear_source(src)
                counters.applied[(source, _CLEARED)] += 1
            else:  # not an event type we know: the decoder never produces one
                counters.drop(source, DropReason.UNKNOWN_TAG)
        if new:
            self._model_blocks[src.model] += new
        if stored:
            counters.applied[(source, _STORED)] += stored
        if removed:
            counters.applied[(source, _REMOVED)] += removed
        self._total += len(blocks) - before
        if self._total > self._total_cap:
            self._enforce_total()

    def _store_again_gpu(self, src: SourceState, key: Key, local: int) -> int:
        """Store a GPU key the source already has (the general loop of `_store`, one block);
        returns 1 if `local` became a new hash of the model, else 0."""
        blocks = src.blocks
        old = blocks[key]
        if old == local:  # a duplicate store: one more reference, now most recent
            src.dups[key] = src.dups.get(key, 0) + 1
            del blocks[key]
            blocks[key] = local
            return 0
        # The engine reused a hash for another prefix: forget the old one entirely.
        self._forget(src, key, old)
        blocks[key] = local
        m = self._holders.get(local, 0)
        if m & src.bit:
            self._hm.hold_again_gpu(src, local)
            return 0
        self._holders[local] = m | src.bit
        return 0 if m else 1

    def _chain(self, parent: LocalHash, tokens: Sequence[int], size: int) -> list[LocalHash]:
        """The chained block hash of stores and speculative entries (native_index.py has its
        own, same results)."""
        return chain_hashes(parent, tokens, size)

    def _seed(self, model: str, lora: str | None, salt: str | None) -> int:
        key = (model, lora, salt)
        seed = self._seeds.get(key)
        if seed is None:
            if len(self._seeds) >= 4096:  # salts are per user: keep the cache bounded
                self._seeds.clear()
            seed = self._seeds[key] = seed_hash(model, lora, salt)
        return seed

    def _store(self, src: SourceState, ev: BlockStored) -> bool:
        hashes = ev.block_hashes
        group = ev.group_idx
        if group is not None and group != self._indexed_group:
            self.counters.drop(src.sid, DropReason.WRONG_GROUP)
            return False
        tokens = ev.token_ids
        bs = ev.block_size
        if tokens is None or bs is None or bs <= 0 or len(tokens) != len(hashes) * bs:
            self.counters.drop(src.sid, DropReason.MISALIGNED)
            return False
        if not hashes:
            return True
        parent = ev.parent_block_hash
        lora = ev.lora_name
        salt = ev.cache_salt if parent is None else None  # a salt seeds block 0 only
        medium = ev.medium
        on_gpu = medium is None or medium == GPU
        blocks = src.blocks
        if parent is None:
            if salt is None:
                seed = src.seeds.get(lora)
                if seed is None:
                    seed = src.seeds[lora] = self._seed(src.model, lora, None)
                start: int = seed
            else:
                start = self._seed(src.model, lora, salt)
        else:
            found = blocks.get(parent)
            if found is None and src.media:
                found = self._find_parent(src, parent)
            if found is None:
                self.counters.drop(src.sid, DropReason.ORPHAN)
                return False
            start = found
        single = len(hashes) == 1
        try:
            if single:
                packed = array("I")
                if type(tokens) is list:
                    packed.fromlist(tokens)  # a third faster than array("I", tokens)
                else:
                    packed.extend(tokens)
                if _SWAP:
                    packed.byteswap()
                local = xxh3_64_intdigest(packed, start)
            else:
                locals_: list[int] = self._chain(LocalHash(start), tokens, bs)  # type: ignore[assignment]
        except (IndexStateError, OverflowError, TypeError):
            self.counters.drop(src.sid, DropReason.MALFORMED)
            return False
        if bs != src.last_size or lora != src.last_lora:
            src.last_size = bs
            src.last_lora = lora
            if (lora, bs) not in src.partitions:
                self._add_partition(src, (lora, bs))
        spec = self._spec_by_engine.get(src.engine)
        holders = self._holders
        bit = src.bit
        if single and on_gpu:  # the common case, without the loop below
            eh = hashes[0]
            if spec:
                spec.pop(local, None)
            if eh not in blocks:
                blocks[eh] = local
                m = holders.get(local, 0)
                if not m & bit:
                    holders[local] = m | bit
                    if not m:
                        self._model_blocks[src.model] += 1
                else:
                    self._hm.hold_again_gpu(src, local)
                return True
        if single:
            locals_ = [local]
        if not on_gpu:
            assert medium is not None
            src.media.add(medium)
        new_blocks = 0
        for eh, local in zip(hashes, locals_, strict=True):
            key = eh if on_gpu else (medium, eh)
            if spec:
                spec.pop(local, None)
            old = blocks.get(key)
            if old is not None:
                if old == local:  # a duplicate store: one more reference, now most recent
                    src.dups[key] = src.dups.get(key, 0) + 1
                    del blocks[key]
                    blocks[key] = local
                    continue
                # The engine reused a hash for another prefix: forget the old one entirely.
                self._forget(src, key, old)
            blocks[key] = local
            if on_gpu:
                m = holders.get(local, 0)
                if not m & bit:  # fast path: a new holder
                    holders[local] = m | bit
                    if not m:
                        new_blocks += 1
                else:
                    self._hm.hold_again_gpu(src, local)
            else:
                assert medium is not None
                self._hm.hold_other(src, medium, local)
        if new_blocks:
            self._model_blocks[src.model] += new_blocks
        return True

    def _find_parent(self, src: SourceState, parent: object) -> int | None:
        for medium in sorted(src.media):
            found = src.blocks.get((medium, parent))
            if found is not None:
                return found
        return None

    def _add_partition(self, src: SourceState, part: tuple[str | None, int]) -> None:
        src.partitions.add(part)
        sizes = self._parts.setdefault((src.model, part[0]), {})
        sizes[part[1]] = sizes.get(part[1], 0) | src.bit

    def _remove(self, src: SourceState, ev: BlockRemoved) -> bool:
        group = ev.group_idx
        if group is not None and group != self.limits.indexed_group:
            self.counters.drop(src.sid, DropReason.WRONG_GROUP)
            return False
        medium = ev.medium or GPU
        on_gpu = medium == GPU
        blocks = src.blocks
        dups = src.dups
        known = 0
        for eh in ev.block_hashes:
            key = eh if on_gpu else (medium, eh)
            local = blocks.get(key)
            if local is None:
                self.counters.drop(src.sid, DropReason.UNKNOWN_BLOCK)
                continue
            known += 1
            if dups:
                n = dups.get(key)
                if n is not None:  # another physical copy is still resident
                    if n > 1:
                        dups[key] = n - 1
                    else:
                        del dups[key]
                    continue
            del blocks[key]
            self._hm.release(src, medium, local)
        return known > 0 or not ev.block_hashes

    def _forget(self, src: SourceState, key: Key, local: int) -> None:
        """Drop a key with all its references (hash reuse, eviction)."""
        del src.blocks[key]
        if src.dups:
            src.dups.pop(key, None)
        self._hm.release(src, key[0] if type(key) is tuple else GPU, local)

    def _clear_source(self, src: SourceState) -> None:
        """Drop every block of a source (AllBlocksCleared, reset, removal); the caller keeps
        `_total` right. The containers are cleared in place: `apply` holds references."""
        blocks = src.blocks
        if src.media or src.aliases:
            for key, local in list(blocks.items()):
                self._forget(src, key, local)
        else:  # GPU only, no aliases: every key is one holder bit
            holders = self._holders
            keep = ~src.bit
            gone = 0
            for local in blocks.values():
                m = holders[local] & keep
                if m:
                    holders[local] = m
                else:
                    del holders[local]
                    gone += 1
            if gone:
                self._model_blocks[src.model] -= gone
        blocks.clear()
        src.dups.clear()
        src.aliases.clear()
        src.media.clear()
        for lora, size in src.partitions:
            sizes = self._parts[(src.model, lora)]
            rest = sizes[size] & ~src.bit
            if rest:
                sizes[size] = rest
            else:
                del sizes[size]
                if not sizes:
                    del self._parts[(src.model, lora)]
        src.partitions.clear()
        src.last_size = 0

    # --- bounds -------------------------------------------------------------------------------

    def _evict(self, src: SourceState, n: int) -> None:
        """Drop the `n` least recently stored blocks of `src`, counted `over_limit`."""
        # Taking a run of victims at once keeps the scan over the dict's deleted slots
        # amortised (dicts compact on their next resize).
        victims = list(islice(src.blocks.items(), max(n, 0)))
        for key, local in victims:
            self._forget(src, key, local)
        if victims:
            self.counters.drop(src.sid, DropReason.OVER_LIMIT, len(victims))

    def _enforce_total(self) -> None:
        limit = self._total_cap
        while self._total > limit:
            largest = max(self._sources.values(), key=lambda s: len(s.blocks))
            before = len(largest.blocks)
            if not before:  # unreachable while _total is kept right; never loop forever
                self._total = 0
                return
            self._evict(largest, min(before, self._total - limit + (limit >> 8)))
            self._total -= before - len(largest.blocks)

    # --- queries ------------------------------------------------------------------------------

    def _fallback_sizes(self, model: str) -> dict[int, int]:
        """Block sizes (with no candidate sources) for a (model, LoRA) without blocks yet: the
        model's other sizes, else `limits.default_block_size`, so a cold burst still sticks."""
        return dict.fromkeys(self.block_sizes(model) or (self.limits.default_block_size,), 0)

    def block_sizes(self, model: str) -> set[int]:
        """Block sizes of the blocks held for `model` (any LoRA)."""
        return {size for (m, _), sizes in self._parts.items() if m == model for size in sizes}

    def source_block_count(self, source: SourceId) -> int:
        """(medium, block) entries the source holds; 0 for unknown sources."""
        src = self._sources.get(source)
        return len(src.blocks) if src is not None else 0

    def engine_block_counts(self) -> dict[str, int]:
        """(medium, block) entries held per engine, over its sources (DP ranks): how much of
        its KV pools the engine has filled, for kv_aware's eviction term (gateway/service.py)."""
        counts: dict[str, int] = {}
        for src in self._sources.values():
            counts[src.engine] = counts.get(src.engine, 0) + len(src.blocks)
        return counts

    def engine_removed_counts(self) -> dict[str, int]:
        """BlockRemoved events applied per engine, over its current sources (a source removed
        takes its count with it): whether an engine's pool is evicting (routing/eviction.py)."""
        applied = self.counters.applied
        counts: dict[str, int] = {}
        for source, src in self._sources.items():
            counts[src.engine] = counts.get(src.engine, 0) + applied.get((source, _REMOVED), 0)
        return counts

    def maintain(self, source: SourceId) -> bool:
        """Deferred upkeep while `source`'s socket is empty; True while more remains (the
        reference has none: see NativePrefixIndex.maintain)."""
        return False

    # --- snapshots ----------------------------------------------------------------------------

    def export_source(self, source: SourceId) -> SourceExport | None:
        """What a snapshot keeps of `source` (index/export.py); None for unknown sources."""
        src = self._sources.get(source)
        if src is None:
            return None
        return SourceExport(
            sorted(src.partitions, key=lambda p: (p[0] or "", p[1])),
            src.last_size,
            src.last_lora,
            self._export_pairs(src),
        )

    def _export_pairs(self, src: SourceState) -> bytes:
        return pairs_of(src.blocks)

    def restore_source(self, source: SourceId, export: SourceExport) -> int:
        """Put an exported source's blocks back into `source`, which must be known and hold
        nothing; the most recently stored first when the limits keep fewer. Returns the blocks
        restored. The caller marks the source stale until its engine proves continuity."""
        src = self._sources.get(source)
        if src is None or src.blocks:
            raise IndexStateError(f"restore_source {source}: expected a known, empty source")
        for part in export.partitions:
            if part not in src.partitions:
                self._add_partition(src, part)
        src.last_size = export.last_size
        src.last_lora = export.last_lora
        room = min(self._block_cap, max(0, self._total_cap - self._total))
        pairs = export.pairs
        if len(pairs) // 16 > room:
            pairs = pairs[len(pairs) - room * 16 :]
        before = len(src.blocks)
        self._restore_pairs(src, pairs)
        restored = len(src.blocks) - before
        self._total += restored
        return restored

    def _restore_pairs(self, src: SourceState, pairs: bytes) -> None:
        values = array("Q")
        values.frombytes(pairs)
        if _BIG_ENDIAN_HOST:
            values.byteswap()
        blocks = src.blocks
        holders = self._holders
        bit = src.bit
        new = 0
        for k, v in zip(values[0::2], values[1::2], strict=True):
            m = holders.get(v, 0)
            if k in blocks or m & bit:  # an alias or a repeat: left out (smaller, never larger)
                continue
            blocks[k] = v
            holders[v] = m | bit
            if not m:
                new += 1
        self._model_blocks[src.model] += new

    def memory(self) -> dict[str, int]:
        """The byte budget and what counts against it (`kvroute_index_bytes` on /metrics):
        `accounted` = entries × `entry_bytes`; `allocated` = bytes the native tables hold
        (0 for the Python index, whose objects Python's allocator owns)."""
        return {
            "budget": self.limits.max_index_bytes,
            "accounted": self._total * self.entry_bytes,
            "allocated": 0,
            "entries": self._total,
            "capacity": self._total_cap,
        }

    def blocks_by_model(self) -> dict[str, int]:
        """Distinct local hashes held per model (the `kvroute_index_blocks` gauge)."""
        return {m: n for m, n in self._model_blocks.items() if n}

    def holdings(self, source: SourceId) -> set[tuple[LocalHash, str]]:
        """(local hash, medium) pairs the source holds; for tests and debugging."""
        src = self._sources.get(source)
        if src is None:
            return set()
        return {
            (LocalHash(local), key[0] if type(key) is tuple else GPU)
            for key, local in src.blocks.items()
        }

    def match(
        self,
        model: str,
        lora: str | None,
        token_ids: Sequence[int],
        *,
        cache_salt: str | None = None,
    ) -> dict[str, MatchResult]:
        """Per engine, the longest contiguous prefix of the prompt it holds (non-stale sources),
        for each block size in use for (model, lora); engines with nothing matched are absent.

        Raises IndexStateError if a token id it needs to hash is not a uint32.
        """
        sizes = self._parts.get((model, lora))
        if not sizes:
            if not any(self._spec_by_engine.values()):
                return {}
            sizes = self._fallback_sizes(model)  # speculative entries only
        now = self._clock()
        self._spec.purge(now)
        seed = self._seed(model, lora, cache_salt)
        return match_sizes(
            self._hm,
            self._by_bit,
            self._spec_by_engine,
            sizes,
            token_ids,
            seed,
            ~self._stale_bits,
            now,
        )

    # --- speculative entries ------------------------------------------------------------------

    def speculative_head(
        self, model: str, lora: str | None, token_ids: Sequence[int]
    ) -> Sequence[int]:
        """The leading tokens `add_speculative` enters (limits.max_speculative_per_request
        blocks of the largest size in use): all another replica needs of a claim."""
        sizes = self._parts.get((model, lora)) or self._fallback_sizes(model)
        cap = self.limits.max_speculative_per_request * max(sizes)
        return token_ids if len(token_ids) <= cap else token_ids[:cap]

    def add_speculative(
        self,
        engine: str,
        model: str,
        lora: str | None,
        token_ids: Sequence[int],
        *,
        cache_salt: str | None = None,
    ) -> None:
        """Remember that a request with this prompt was just sent to `engine`: its blocks count
        as `speculative_blocks` for `limits.speculative_ttl_s`, or until events confirm them.
        Hashed for each block size in use for (model, lora), or `_fallback_sizes`."""
        sizes = self._parts.get((model, lora)) or self._fallback_sizes(model)
        seed = LocalHash(self._seed(model, lora, cache_salt))
        limit = min(self._spec.max_per_engine, self.limits.max_speculative_per_request)
        chains = []
        for size in sizes:
            # At most `limit` leading blocks, so evicting older entries never takes this
            # prompt's block 0.
            head = token_ids if len(token_ids) <= limit * size else token_ids[: limit * size]
            chains.append(self._chain(seed, head, size))
        self._spec.add(engine, chains)
