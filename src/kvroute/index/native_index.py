"""The prefix index on the compiled core (`_native.c`): `PrefixIndex`'s rules, which stay the
reference model, over flat native block tables with the hot loops in C."""

# Every rule lives once, in `PrefixIndex`. This subclass swaps the per-source block maps and the
# holder map for `NativeMap`s (dict semantics, flat u64 arrays) and runs the common store and
# remove, the match walk, clearing and eviction in C. Anything else (other media, LoRA switches,
# orphans, duplicates, bytes hashes, holder bits past 63) goes through the reference code, which
# works on the native maps unchanged. tests/unit/index/test_native_differential.py checks that
# both give the same observable results after every batch.

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from kvroute.core import (
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
from kvroute.index import _native  # type: ignore[attr-defined]
from kvroute.index.holders import SourceState
from kvroute.index.limits import IndexLimits
from kvroute.index.prefix_index import PrefixIndex

__all__ = [
    "TOKENS_BAD",
    "TOKENS_PLAIN",
    "TOKENS_U32",
    "NativePrefixIndex",
    "batch_verdict",
    "configure_plain",
    "listed_tokens",
    "token_verdict",
]

NativeMap: Any = _native.NativeMap
_apply_run = _native.apply_run
_release_all = _native.release_all
_evict_oldest = _native.evict_oldest
_match_results = _native.match_results
_spec_extend = _native.spec_extend
_token_list = _native.token_list
_native.configure(BlockStored, BlockRemoved, IndexStateError, SourceState, MatchResult, msgspec.Raw)

_STORED = "BlockStored"
_REMOVED = "BlockRemoved"
_CLEARED = "AllBlocksCleared"
_WIDE = 1 << 64  # source bits from here on do not fit the native holder masks
_MAINTAIN_SLOTS = 4096  # entries of a growing table one `maintain` call moves

# `token_verdict(events)` over a batch whose stores carry `token_ids` as msgpack bytes
# (events/wire.py, raw mode): TOKENS_U32 all arrays of uint32, TOKENS_BAD one is not
# `list[int] | None`, anything else some need `listed_tokens` (nil, ints past uint32).
TOKENS_BAD = -1
TOKENS_U32 = 0
token_verdict: Callable[[list[Any]], int] = _native.token_verdict
# `batch_verdict(events)`: token_verdict's answer, except TOKENS_PLAIN when moreover every
# event passes wire.py `_map_batch`'s "plain" test (the raw store type is given once to
# `configure_plain`); TOKENS_U32 then means "uint32 tokens, but normalise the batch".
TOKENS_PLAIN = 3
batch_verdict: Callable[[list[Any]], int] = _native.batch_verdict
configure_plain: Callable[[type], None] = _native.configure_plain


def listed_tokens(ev: Any) -> Any:
    """`ev` with its `token_ids` as a list of ints (or None) when they are msgpack bytes, for
    the reference model's code, which reads them as ints; any other event as is."""
    if isinstance(ev, BlockStored):
        tokens: object = ev.token_ids
        if type(tokens) is msgspec.Raw:
            return msgspec.structs.replace(ev, token_ids=_token_list(tokens))
    return ev


class NativePrefixIndex(PrefixIndex):
    """`PrefixIndex` with native block tables; see the module docstring."""

    # RSS growth per (block, source) with one source, `kvroute bench memory`: 46-49 B at
    # 10^6..10^7 blocks (up to ~60 B while a slot table migrates), rounded up.
    entry_bytes = 52
    impl = "native"
    raw_tokens = True  # stores may carry `token_ids` as msgpack bytes: `apply_run` reads them
    drain_min = 65_536  # a cleared source this big releases its blocks a slice per batch
    drain_per_batch = 4096  # ... this many per applied batch (about 0.2 ms)

    def __init__(
        self,
        limits: IndexLimits | None = None,
        *,
        counters: EventCounters | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(limits, counters=counters, clock=clock)
        # One native map holds at most MAX_ENTRIES (2^26 - 2). Half of it bounds all entries, so
        # every map stays under it: a source's blocks, and the holder map's distinct blocks even
        # while cleared sources still drain from it (~33 M entries, a 1.7 GB budget at most).
        self._total_cap = min(self._total_cap, _native.MAX_ENTRIES // 2)
        # Block maps of cleared sources still in the holder masks under their old bit.
        self._draining: list[tuple[Any, int, str]] = []
        self._run_out: list[int] = [0] * 5  # apply_run's counts, filled in place
        self._engine_of: list[str | None] | None = None  # match_results' bit -> engine
        self._applied_keys: dict[SourceId, tuple[tuple[str, str], tuple[str, str]]] = {}
        self._nh: Any = NativeMap()  # the holder map, typed as what it is
        self._hm.any = self._holders = self._nh

    def add_source(self, source: SourceId, *, engine: str, model: str) -> None:
        self._engine_of = None
        super().add_source(source, engine=engine, model=model)
        src = self._sources[source]
        if type(src.blocks) is dict and not src.blocks:
            src.blocks = NativeMap()

    def remove_source(self, source: SourceId) -> None:
        self._engine_of = None
        self._applied_keys.pop(source, None)
        super().remove_source(source)

    def _chain(self, parent: LocalHash, tokens: Sequence[int], size: int) -> list[LocalHash]:
        out: list[LocalHash] = _native.chain_hashes(parent, tokens, size)
        return out

    def _unknown_block(self, src: SourceState) -> None:
        # Called from the C remove loop: the reference's count for a hash the source lacks.
        self.counters.drop(src.sid, DropReason.UNKNOWN_BLOCK)

    def _native_ok(self, src: SourceState) -> bool:
        return src.bit < _WIDE and not self._nh.objects()

    def apply(self, source: SourceId, batch: EventBatch) -> None:
        if self._draining:
            self._drain(self.drain_per_batch)
        src = self._sources.get(source)
        # Holder masks hold objects only once a bit past 63 was handed out.
        if src is None or (self._next_bit > _WIDE and not self._native_ok(src)):
            events = [listed_tokens(ev) for ev in batch.events]
            super().apply(source, msgspec.structs.replace(batch, events=events))
            return
        counters = self.counters
        holders = self._nh
        cap = self._block_cap
        group0 = self._indexed_group
        spec = self._spec_by_engine.get(src.engine) if self._spec_by_engine else None
        events = batch.events
        total = len(events)
        stored = removed = delta = grown = 0
        out = self._run_out
        i = 0
        while i < total:
            # A clear may hand the source a fresh block map and bit: read both again each time.
            blocks = src.blocks
            before = len(blocks)
            i = _apply_run(self, src, blocks, holders, src.bit, events, i, cap, group0, spec, out)
            unhandled, s, r, new, gone = out
            stored += s
            removed += r
            delta += new - gone
            if len(blocks) > cap:
                self._evict(src, len(blocks) - cap + (cap >> 8))
            grown += len(blocks) - before
            if not unhandled:
                continue
            # The reference model's general branch of `PrefixIndex.apply`, for one event.
            ev = listed_tokens(events[i])
            i += 1
            before = len(src.blocks)
            if isinstance(ev, BlockStored):
                if self._store(src, ev):
                    stored += 1
                    if len(src.blocks) > cap:
                        self._evict(src, len(src.blocks) - cap + (cap >> 8))
            elif type(ev) is BlockRemoved:
                if self._remove(src, ev):
                    removed += 1
            elif type(ev) is AllBlocksCleared:
                self._clear_source(src)
                counters.applied[(source, _CLEARED)] += 1
            else:
                counters.drop(source, DropReason.UNKNOWN_TAG)
            grown += len(src.blocks) - before
        if delta:
            self._model_blocks[src.model] += delta
        if stored or removed:
            # Keys made once per source: a tuple per batch is a GC-tracked allocation.
            keys = self._applied_keys.get(source)
            if keys is None:
                keys = self._applied_keys[source] = ((source, _STORED), (source, _REMOVED))
            if stored:
                counters.applied[keys[0]] += stored
            if removed:
                counters.applied[keys[1]] += removed
        self._total += grown
        if self._total > self._total_cap:
            self._enforce_total()

    def _plain(self, src: SourceState) -> bool:
        """Whether the C loops may take `src`: GPU only, no aliases, a bit under 64."""
        return not (src.media or src.aliases) and self._native_ok(src)

    def _clear_source(self, src: SourceState) -> None:
        blocks = src.blocks
        if not self._plain(src):
            super()._clear_source(src)
            return
        # An engine that clears its cache fills it again: the fresh map is sized for what the
        # source held, so it does not grow step by step meanwhile (design §12).
        size = len(blocks)
        if size < self.drain_min or (not self._free_bits and self._next_bit >= _WIDE):
            gone = _release_all(blocks, self._holders, src.bit)
            if gone:
                self._model_blocks[src.model] -= gone
            blocks.clear()
            super()._clear_source(src)  # the rest; its block loop finds nothing left
            NativeMap.reserve(blocks, size)  # after: the reference's clear() would free it
            return
        # A big source: hand it a fresh map and a fresh bit now (O(1)) and take the old bit out
        # of the holder masks a slice per batch (`_drain`). The old bit is in no partition any
        # more, so `match` never counts it; it is reused only once drained.
        src.blocks = NativeMap()
        super()._clear_source(src)  # partitions, dups, aliases, media, with the old bit
        NativeMap.reserve(src.blocks, size)
        old = src.bit
        new = self._free_bits.pop() if self._free_bits else self._take_next_bit()
        src.bit = new
        self._engine_of = None
        del self._by_bit[old]
        self._by_bit[new] = src
        self._model_bits[src.model] = (self._model_bits[src.model] & ~old) | new
        if src.stale:
            self._stale_bits = (self._stale_bits & ~old) | new
        self._draining.append((blocks, old, src.model))

    def _take_next_bit(self) -> int:
        bit = self._next_bit
        self._next_bit <<= 1
        return bit

    def _drain(self, budget: int) -> None:
        """Take up to `budget` blocks of cleared sources out of the holder masks."""
        while self._draining and budget > 0:
            blocks, bit, model = self._draining[0]
            done, gone = _evict_oldest(blocks, self._holders, bit, budget, {})
            budget -= done
            if gone:
                self._model_blocks[model] -= gone
            if not blocks:
                self._draining.pop(0)
                self._free_bits.append(bit)

    def _export_pairs(self, src: SourceState) -> bytes:
        if type(src.blocks) is NativeMap:
            out: bytes = _native.int_pairs(src.blocks)
            return out
        return super()._export_pairs(src)

    def _restore_pairs(self, src: SourceState, pairs: bytes) -> None:
        if type(src.blocks) is not NativeMap or not self._plain(src):
            super()._restore_pairs(src, pairs)
            return
        _, new = _native.restore_pairs(src.blocks, self._nh, src.bit, pairs)
        self._model_blocks[src.model] += new

    def memory(self) -> dict[str, int]:
        out = super().memory()
        maps = [self._nh, *(s.blocks for s in self._sources.values())]
        maps += [blocks for blocks, _, _ in self._draining]
        out["allocated"] = sum(m.nbytes() for m in maps if type(m) is NativeMap)
        return out

    def maintain(self, source: SourceId) -> bool:
        """Idle-time upkeep for `source`, whose socket is empty: a bounded slice (~0.1 ms) of
        the growth of the holder map or of the source's own block map (only its inserts grow
        it; inserts move slots too, so growth finishes either way), else of draining cleared
        sources. True while more remains."""
        src = self._sources.get(source)
        maps: list[Any] = [self._nh] if src is None else [self._nh, src.blocks]
        for m in maps:
            if type(m) is NativeMap and m.migrate_some(_MAINTAIN_SLOTS):
                return True
        if self._draining:
            self._drain(self.drain_per_batch)
        return bool(self._draining)

    def blocks_by_model(self) -> dict[str, int]:
        self._drain(1 << 62)  # exact counts: a scrape after a clear pays the rest of the drain
        return super().blocks_by_model()

    def _evict(self, src: SourceState, n: int) -> None:
        if not self._plain(src):
            super()._evict(src, n)
            return
        evicted, gone = _evict_oldest(src.blocks, self._holders, src.bit, max(n, 0), src.dups)
        if gone:
            self._model_blocks[src.model] -= gone
        if evicted:
            self.counters.drop(src.sid, DropReason.OVER_LIMIT, evicted)

    def match(
        self,
        model: str,
        lora: str | None,
        token_ids: Sequence[int],
        *,
        cache_salt: str | None = None,
    ) -> dict[str, MatchResult]:
        sizes = self._parts.get((model, lora))
        if not sizes or len(sizes) != 1 or self._nongpu or self._nh.objects():
            return super().match(model, lora, token_ids, cache_salt=cache_salt)
        ((size, bits),) = sizes.items()
        alive = bits & ~self._stale_bits
        if alive >= _WIDE:
            return super().match(model, lora, token_ids, cache_salt=cache_salt)
        n = len(token_ids) // size
        if not n:
            return {}
        now = self._clock()
        self._spec.purge(now)
        seed = self._seed(model, lora, cache_salt)
        engines = self._engine_of
        if engines is None:  # bit position -> engine name, rebuilt after the bits change
            engines = self._engine_of = [None] * 64
            for bit, src in self._by_bit.items():
                if bit < _WIDE:
                    engines[bit.bit_length() - 1] = src.engine
        out: dict[str, MatchResult] = _match_results(
            self._nh, token_ids, n, size, seed, alive, engines
        )
        if any(self._spec_by_engine.values()):
            self._add_speculative_blocks(out, token_ids, n, size, seed, now)
        return out

    def _add_speculative_blocks(
        self,
        out: dict[str, MatchResult],
        token_ids: Sequence[int],
        n: int,
        size: int,
        seed: int,
        now: float,
    ) -> None:
        # matching.py match_size's speculative part, over hashes from the C chain: per engine
        # with entries, the leading blocks confirmed or routed there within the TTL.
        # No prompt enters a speculative entry past its first max_speculative_per_request
        # blocks (prefix_index.add_speculative), so none can extend a match past them: hashing
        # the rest of a long prompt (10^6 tokens: ~16 ms) finds nothing.
        n = min(n, self.limits.max_speculative_per_request, self._spec.max_per_engine)
        hashes = _native.chain_hashes(seed, token_ids[: n * size], size)
        for engine, j in _spec_extend(hashes, n, self._spec_by_engine, out, now).items():
            confirmed = out.get(engine)
            if confirmed is None:
                out[engine] = MatchResult(0, 0, {}, j, size)
            else:
                out[engine] = MatchResult(
                    confirmed.blocks, confirmed.tokens, confirmed.by_medium, j, size
                )
