"""vLLM's KV events with every field any release sends (0.9.0 – 0.33.0), as sent: what the
encoder writes byte for byte and `decode_vllm` reads back; the router itself uses `kvroute.core`."""

from __future__ import annotations

from typing import Any, TypeAlias

import msgspec

from kvroute.core import EngineHash

__all__ = [
    "VllmAllBlocksCleared",
    "VllmBlockRemoved",
    "VllmBlockStored",
    "VllmEvent",
    "VllmEventBatch",
]


class VllmBlockStored(msgspec.Struct, frozen=True, gc=False, tag_field="type", tag="BlockStored"):
    """vLLM's `BlockStored`: the union of every release's fields; one a release lacks is None."""

    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None = None
    token_ids: list[int] | None = None
    block_size: int | None = None
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[list[int]] | None = None


class VllmBlockRemoved(msgspec.Struct, frozen=True, gc=False, tag_field="type", tag="BlockRemoved"):
    """vLLM's `BlockRemoved` (in practice one hash per event, once per physical copy)."""

    block_hashes: list[EngineHash]
    medium: str | None = None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class VllmAllBlocksCleared(
    msgspec.Struct, frozen=True, gc=False, tag_field="type", tag="AllBlocksCleared"
):
    """vLLM's `AllBlocksCleared` (`/reset_prefix_cache`, sleep/wake)."""


VllmEvent: TypeAlias = VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared


class VllmEventBatch(msgspec.Struct, frozen=True, gc=False):
    """vLLM's `KVEventBatch`: one scheduler step's events. `skipped_events` counts events of kinds
    the decoder does not know (left out)."""

    ts: float
    events: list[VllmEvent]
    data_parallel_rank: int | None = None
    skipped_events: int = 0
