"""The match walk: a prompt's chained block hashes through the holder masks, for one block size;
the longest contiguous prefix per engine, with media and speculative blocks."""

from __future__ import annotations

from collections.abc import Sequence

from xxhash import xxh3_64_intdigest

from kvroute.core import GPU, LocalHash, MatchResult
from kvroute.index.hashing import chain_hashes, pack_tokens
from kvroute.index.holders import Holders, SourceState

__all__ = ["match_size", "match_sizes"]


def match_sizes(
    hm: Holders,
    by_bit: dict[int, SourceState],
    spec_by_engine: dict[str, dict[int, float]],
    sizes: dict[int, int],
    token_ids: Sequence[int],
    seed: int,
    live: int,
    now: float,
) -> dict[str, MatchResult]:
    """`PrefixIndex.match` over `sizes` (block size -> candidate source bits; `live` masks
    out stale ones): per engine, the size under which it holds the most tokens."""
    if len(sizes) == 1:  # the common case: one block size, nothing to merge
        ((size, bits),) = sizes.items()
        n = len(token_ids) // size
        if not n:
            return {}
        return match_size(hm, by_bit, spec_by_engine, token_ids, n, size, seed, bits & live, now)
    out: dict[str, MatchResult] = {}
    for size in sorted(sizes):
        n = len(token_ids) // size
        if n == 0:
            continue
        for engine, result in match_size(
            hm, by_bit, spec_by_engine, token_ids, n, size, seed, sizes[size] & live, now
        ).items():
            best = out.get(engine)
            if best is None or (result.tokens, result.speculative_blocks * size) > (
                best.tokens,
                best.speculative_blocks * best.block_size,
            ):
                out[engine] = result
    return out


def match_size(
    hm: Holders,
    by_bit: dict[int, SourceState],
    spec_by_engine: dict[str, dict[int, float]],
    token_ids: Sequence[int],
    n: int,
    size: int,
    seed: int,
    candidates: int,
    now: float,
) -> dict[str, MatchResult]:
    """Per engine, the blocks of the first `n` blocks of `token_ids` (of `size` tokens) its
    sources in `candidates` hold as a contiguous prefix; `PrefixIndex.match` for one size."""
    step = size * 4
    hashes: list[int] = []
    lengths: dict[int, int] = {}  # source bit -> matched blocks
    nongpu_counts: dict[int, dict[str, int]] = {}  # source bit -> medium -> blocks
    alive = candidates
    get = hm.any.get
    nongpu = hm.nongpu
    h = seed
    if alive:
        packed = pack_tokens(token_ids[: n * size] if len(token_ids) != n * size else token_ids)
        xxh = xxh3_64_intdigest
        if spec_by_engine or nongpu:  # the general walk: keep the hashes, credit media
            for offset in range(0, n * step, step):
                h = xxh(packed[offset : offset + step], h)
                hashes.append(h)
                m = alive & get(h, 0)
                if m != alive:
                    _ended(alive ^ m, offset // step, lengths)
                    alive = m
                    if not alive:
                        break
                if nongpu:
                    other = alive & nongpu.get(h, 0)
                    if other:
                        hm.count_best_medium(h, other, nongpu_counts)
        else:  # GPU copies only, no speculative entries: the same walk, minus both
            for offset in range(0, n * step, step):
                h = xxh(packed[offset : offset + step], h)
                m = alive & get(h, 0)
                if m != alive:
                    gone = alive ^ m
                    i = offset // step
                    while gone:  # `_ended`, inlined: up to once per source
                        low = gone & -gone
                        lengths[low] = i
                        gone ^= low
                    alive = m
                    if not alive:
                        break
    _ended(alive, n, lengths)

    out: dict[str, MatchResult] = {}
    chosen: dict[str, str] = {}  # engine -> the source its result is from
    for bit, blocks in lengths.items():
        if not blocks:
            continue
        src = by_bit[bit]
        engine = src.engine
        counts = nongpu_counts.get(bit) if nongpu_counts else None
        if counts:
            by_medium = dict(counts)
            on_gpu = blocks - sum(counts.values())
            if on_gpu:
                by_medium[GPU] = on_gpu
        else:
            on_gpu = blocks
            by_medium = {GPU: blocks}
        best = out.get(engine)
        if best is not None:
            # Per engine the DP rank with the most blocks, then the most on GPU, then the
            # lowest source id: an order that does not depend on how bits were handed out.
            have = (best.blocks, best.by_medium.get(GPU, 0))
            if have > (blocks, on_gpu) or (have == (blocks, on_gpu) and chosen[engine] < src.sid):
                continue
        out[engine] = MatchResult(blocks, blocks * size, by_medium, 0, size)
        chosen[engine] = src.sid

    if spec_by_engine:
        for engine, entries in spec_by_engine.items():
            if not entries:
                continue
            confirmed = out.get(engine)
            # Confirmed blocks count as covered: look for speculative ones only past them (every
            # engine routed to within the TTL has entries; a walk from 0 for each was the cost).
            j = confirmed.blocks if confirmed is not None else 0
            while j < n:
                if j >= len(hashes):  # the confirmed walk stopped early: hash the rest
                    parent = LocalHash(hashes[-1] if hashes else seed)
                    hashes += chain_hashes(parent, token_ids[j * size : n * size], size)
                if entries.get(hashes[j], 0.0) > now:
                    j += 1
                else:
                    break
            if j == 0:
                continue
            if confirmed is None:
                out[engine] = MatchResult(0, 0, {}, j, size)
            else:
                out[engine] = MatchResult(
                    confirmed.blocks, confirmed.tokens, confirmed.by_medium, j, size
                )
    return out


def _ended(bits: int, blocks: int, lengths: dict[int, int]) -> None:
    # Each source in `bits` holds exactly the first `blocks` blocks.
    while bits:
        low = bits & -bits
        lengths[low] = blocks
        bits ^= low
