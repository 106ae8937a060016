"""The index's bounds (`IndexLimits`), kept apart so settings can name them without the index."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["IndexLimits"]


@dataclass(frozen=True)
class IndexLimits:
    """Bounds of the index. The index holds at most `max_index_bytes`, counting each (block,
    source) entry at its implementation's measured cost (`PrefixIndex.entry_bytes`); beyond it,
    or beyond an optional block cap (0: none), the least recently stored blocks of the largest
    source are dropped (counted `over_limit`), a little below the bound (1/256 of it) so
    eviction stays amortised O(1). Largest first keeps it fair: no source starves another."""

    max_index_bytes: int = 1 << 30
    max_blocks_per_source: int = 0
    max_blocks_total: int = 0
    indexed_group: int = 0  # the KV-cache group indexed; events of group None count as it
    speculative_ttl_s: float = 2.0
    max_speculative_per_engine: int = 65_536
    # Blocks of one prompt entered speculatively: a burst sharing a new prefix is steered by its
    # first 2,048 blocks (32k tokens of 16) as well as by all of them, and a 10^6-token prompt
    # cost the loop ~100 ms to enter whole (62,500 blocks, ~1.6 us each).
    max_speculative_per_request: int = 2_048
    default_block_size: int = 16  # speculative hashing before any event names the block size
