"""The normalised KV events the index consumes, free of any engine release's wire details:
`events/wire.py` converts every vLLM payload into these once (docs/architecture.md)."""

from __future__ import annotations

from typing import Final, TypeAlias

import msgspec

from kvroute.core.ids import EngineHash

__all__ = ["GPU", "AllBlocksCleared", "BlockRemoved", "BlockStored", "Event", "EventBatch"]

GPU: Final = "GPU"
"""The medium of an event that names none (the engine's own block pool)."""


class BlockStored(msgspec.Struct, frozen=True, gc=False, tag_field="type", tag="BlockStored"):
    """A run of newly cached full blocks of one request; hashes chain from `parent_block_hash`.

    `token_ids` covers every block (`len == len(block_hashes) * block_size` when well formed;
    the index counts anything else `misaligned`). `lora_name` and `cache_salt` are what, besides
    the tokens, decides the prefix (the index seeds its hash with them); the decoder drops events
    whose prefix depends on anything else (`unsupported_extra_keys`). `medium` is upper case or
    None (GPU); `group_idx` None means the engine's only KV-cache group. Events are tagged by
    kind (`"type"`), so they encode self-describing (`kvroute events decode` prints them).
    """

    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None = None
    token_ids: list[int] | None = None
    block_size: int | None = None
    lora_name: str | None = None
    medium: str | None = None
    group_idx: int | None = None
    cache_salt: str | None = None


class BlockRemoved(msgspec.Struct, frozen=True, gc=False, tag_field="type", tag="BlockRemoved"):
    """Blocks evicted from one medium (one event per physical copy)."""

    block_hashes: list[EngineHash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(
    msgspec.Struct, frozen=True, gc=False, tag_field="type", tag="AllBlocksCleared"
):
    """The engine dropped its whole prefix cache (`/reset_prefix_cache`, sleep/wake)."""


Event: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, frozen=True, gc=False):
    """One scheduler step's events from one engine source, in the order they happened.

    The decoder leaves out, and counts here, events of kinds it does not know
    (`skipped_events`, dropped as `unknown_tag`) and stores whose prefix our hash cannot
    reproduce (`unsupported_events`, dropped as `unsupported_extra_keys`).
    """

    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None
    skipped_events: int = 0
    unsupported_events: int = 0
