"""Our own chained block hash (docs/architecture.md "Block hash"), for events and prompts alike:
xxh3-64 of each block's token ids as 4-byte big-endian ints, seeded by the previous block's hash."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

from xxhash import xxh3_64_intdigest

from kvroute.core import LocalHash
from kvroute.errors import IndexStateError

__all__ = ["chain_hashes", "pack_tokens", "prompt_hashes", "seed_hash"]

SWAP_BYTES = sys.byteorder == "little"
"""True on little-endian hosts: array('I') must be byte-swapped to big-endian."""


def seed_hash(model: str, lora_name: str | None = None, cache_salt: str | None = None) -> LocalHash:
    """The parent of block 0: xxh3-64 of ``model NUL lora NUL salt`` (UTF-8)."""
    key = f"{model}\0{lora_name or ''}\0{cache_salt or ''}".encode("utf-8", "surrogatepass")
    return LocalHash(xxh3_64_intdigest(key))


def pack_tokens(token_ids: Sequence[int]) -> bytes:
    """Token ids as consecutive 4-byte big-endian unsigned ints; IndexStateError if one is not."""
    try:
        if type(token_ids) is list:
            packed = array("I")
            packed.fromlist(token_ids)  # a third faster than array("I", token_ids)
        else:
            packed = array("I", token_ids)
    except (OverflowError, TypeError) as exc:
        raise IndexStateError(
            f"token_ids: expected ints in [0, 2**32), got {_describe_bad(token_ids)}"
        ) from exc
    if SWAP_BYTES:
        packed.byteswap()
    return packed.tobytes()


def _describe_bad(token_ids: Sequence[int]) -> str:
    for t in token_ids:
        if type(t) is not int or not 0 <= t < 1 << 32:
            return repr(t)[:40]
    return "an unpackable sequence"


def chain_hashes(parent: LocalHash, token_ids: Sequence[int], block_size: int) -> list[LocalHash]:
    """Hashes of the full blocks of `token_ids`, the first chained from `parent`."""
    if block_size <= 0:
        raise IndexStateError(f"block_size: expected a positive int, got {block_size!r}")
    n = len(token_ids) // block_size
    if n == 0:
        return []
    if n * block_size != len(token_ids):
        token_ids = token_ids[: n * block_size]
    packed = pack_tokens(token_ids)
    step = block_size * 4
    h: int = parent
    out: list[LocalHash] = []
    append = out.append
    for start in range(0, n * step, step):
        h = xxh3_64_intdigest(packed[start : start + step], h)
        append(h)  # type: ignore[arg-type]  # LocalHash is an int at runtime
    return out


def prompt_hashes(
    model: str,
    lora_name: str | None,
    token_ids: Sequence[int],
    block_size: int,
    cache_salt: str | None = None,
) -> list[LocalHash]:
    """Hashes of a request prompt's full blocks, as the index stores them for that block size."""
    return chain_hashes(seed_hash(model, lora_name, cache_salt), token_ids, block_size)
