"""What a snapshot keeps of one source's blocks (`PrefixIndex.export_source`): its GPU blocks
in store order as little-endian u64 (engine hash, local hash) pairs, and its partitions."""

from __future__ import annotations

import sys
from array import array

import msgspec

__all__ = ["SourceExport", "pairs_of"]


class SourceExport(msgspec.Struct, frozen=True, gc=False):
    """One source's restorable state. Only GPU blocks under u64 engine hashes are kept (other
    media, bytes hashes, duplicate references and aliases are left out): a restored index may
    hold less than the engine, never more (docs/design.md §14)."""

    partitions: list[tuple[str | None, int]]  # (LoRA name, block size) of its stores
    last_size: int
    last_lora: str | None
    pairs: bytes  # (engine hash, local hash) pairs, LE u64, least recently stored first

    @property
    def blocks(self) -> int:
        return len(self.pairs) // 16


def pairs_of(blocks: dict[object, int]) -> bytes:
    """`pairs` for a dict of engine hash -> local hash (the reference index's block map)."""
    out = array("Q")
    for k, v in blocks.items():
        if type(k) is int and 0 <= k < 1 << 64:
            out.append(k)
            out.append(v)
    if sys.byteorder == "big":
        out.byteswap()
    return out.tobytes()
