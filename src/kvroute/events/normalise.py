"""vLLM's events → `kvroute.core` events: the extra-keys verdict (a cache salt and the LoRA name
our hash reproduces; anything else is dropped and counted), LoRA naming, upper-case media."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from kvroute.core import AllBlocksCleared, BlockRemoved, BlockStored, Event, EventBatch
from kvroute.events.vllm_events import (
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEventBatch,
)

__all__ = ["normalise_batch", "normalise_events", "reproducible_extra_keys"]

_CLEARED: Final = AllBlocksCleared()


def reproducible_extra_keys(ev: Any) -> tuple[bool, str | None]:
    """Whether our hash of this `BlockStored` equals the prefix vLLM hashed, and its cache salt.

    Accepted per-block extra keys: None, the LoRA name (or lora id, or the tagged
    ``("lora", name, ...)``), and on block 0 of a sequence (no parent) a cache salt, raw or
    ``("cache_salt", salt)``. Anything else (multimodal, prompt embeds, lookahead tokens) is not;
    nor is a LoRA adapter known only by id (releases before `lora_name`): hashing it as the base
    model would claim prefixes the base model does not hold. Pinned by test_extra_keys_* in
    tests/unit/events/test_normalise.py.
    """
    if ev.lookahead_token_ids:
        return False, None
    salt: str | None = None
    keys = ev.extra_keys or ()
    first_of_sequence = ev.parent_block_hash is None
    for i, entry in enumerate(keys):
        if entry is None:
            continue
        items = entry if isinstance(entry, list | tuple) else (entry,)
        for item in items:
            if item is None:
                continue
            salt_ok = i == 0 and first_of_sequence and salt is None
            if isinstance(item, str):
                if ev.lora_name is not None and item == ev.lora_name:
                    continue
                if salt_ok:
                    salt = item
                    continue
                return False, None
            if isinstance(item, int) and not isinstance(item, bool):
                if ev.lora_id is not None and item == ev.lora_id:
                    continue
                return False, None
            if isinstance(item, list | tuple) and len(item) >= 2 and isinstance(item[1], str):
                if item[0] == "lora" and item[1] == ev.lora_name:
                    continue
                if item[0] == "cache_salt" and len(item) == 2 and salt_ok:
                    salt = item[1]
                    continue
            return False, None
    if ev.lora_id is not None and ev.lora_name is None:
        return False, None
    return True, salt


def normalise_events(
    raw: Iterable[Any], stored_type: type, removed_type: type, cleared_type: type
) -> tuple[list[Event], int]:
    """Core events for decoded vLLM events (structs with vLLM's field names, of the three types
    given), and how many stores were unsupported.

    The hot path of every batch (events/wire.py `BatchDecoder`): plain-text stores, the common
    case, take one check and one allocation. Media are upper-cased: the Mooncake store sends
    "cpu" where vLLM's pools send "CPU" (pinned by test_medium_is_upper_cased). vLLM >= 0.31
    sends one None per block for plain text (pinned by
    test_plain_text_extra_keys_of_nones_are_kept).
    """
    out: list[Event] = []
    append = out.append
    unsupported = 0
    for e in raw:
        kind = type(e)
        if kind is stored_type:
            keys = e.extra_keys
            if (
                (keys is None or keys.count(None) == len(keys))
                and e.lora_id is None
                and not e.lookahead_token_ids
            ):
                salt = None
            else:
                ok, salt = reproducible_extra_keys(e)
                if not ok:
                    unsupported += 1
                    continue
            medium = e.medium
            append(
                BlockStored(
                    e.block_hashes,
                    e.parent_block_hash,
                    e.token_ids,
                    e.block_size,
                    e.lora_name,
                    medium if medium is None or medium.isupper() else medium.upper(),
                    e.group_idx,
                    salt,
                )
            )
        elif kind is removed_type:
            medium = e.medium
            if kind is BlockRemoved and (medium is None or medium.isupper()):
                append(e)  # decoded straight into the core type (map events)
            else:
                append(BlockRemoved(e.block_hashes, medium and medium.upper(), e.group_idx))
        elif kind is cleared_type:
            append(_CLEARED)
        else:  # a caller's mistake, never the wire's: the decoder produces only the three
            raise TypeError(f"event: expected {stored_type.__name__}, got {kind.__name__}")
    return out, unsupported


def normalise_batch(batch: VllmEventBatch) -> EventBatch:
    """The core batch of a vLLM batch (`decode_vllm`'s result, or one built by hand)."""
    events, unsupported = normalise_events(
        batch.events, VllmBlockStored, VllmBlockRemoved, VllmAllBlocksCleared
    )
    return EventBatch(batch.ts, events, batch.data_parallel_rank, batch.skipped_events, unsupported)
