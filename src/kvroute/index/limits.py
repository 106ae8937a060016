"""The index's bounds (`IndexLimits`), kept apart so settings can name them without the index."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["IndexLimits"]


@dataclass(frozen=True)
class IndexLimits:
    """Bounds of the index. Beyond a cap the least recently stored blocks are dropped (counted
    `over_limit`), a little below the cap (1/256 of it) so eviction scans stay amortised O(1)."""

    max_blocks_per_source: int = 1_000_000
    max_blocks_total: int = 8_000_000
    indexed_group: int = 0  # the KV-cache group indexed; events of group None count as it
    speculative_ttl_s: float = 2.0
    max_speculative_per_engine: int = 65_536
    default_block_size: int = 16  # speculative hashing before any event names the block size
