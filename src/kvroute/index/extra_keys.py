"""Which `BlockStored.extra_keys` our hash reproduces (reference §4.2): the LoRA name and a block-0
cache salt do; multimodal items, prompt embeddings and lookahead tokens do not."""

from __future__ import annotations

from kvroute.events.wire import BlockStored

__all__ = ["reproducible_extra_keys"]


def reproducible_extra_keys(ev: BlockStored) -> tuple[bool, str | None]:
    """Whether our hash of this event equals the prefix vLLM hashed, and the cache salt if any.

    Accepted per-block extra keys (reference §4.2): None, the LoRA name (or lora id, or the
    tagged ``("lora", name, ...)``), and on block 0 of a sequence (no parent) a cache salt, raw
    or ``("cache_salt", salt)``. Anything else (multimodal, prompt embeds, lookahead) is not.
    Pinned by test_extra_keys_* in tests/unit/index/test_prefix_index.py.
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
