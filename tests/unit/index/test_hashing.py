"""Our block hash, pinned to the formula of docs/architecture.md "Block hash"."""

from __future__ import annotations

import struct

import pytest
from xxhash import xxh3_64_intdigest

from kvroute.core import LocalHash
from kvroute.errors import IndexStateError
from kvroute.index import chain_hashes, pack_tokens, prompt_hashes, seed_hash


def _reference_chain(seed: int, tokens: list[int], block_size: int) -> list[int]:
    out, h = [], seed
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size : (i + 1) * block_size]
        h = xxh3_64_intdigest(struct.pack(f">{block_size}I", *block), seed=h)
        out.append(h)
    return out


def test_seed_is_xxh3_of_model_lora_salt_joined_by_nul() -> None:
    assert seed_hash("m") == xxh3_64_intdigest(b"m\x00\x00")
    assert seed_hash("m", "sql", "s1") == xxh3_64_intdigest(b"m\x00sql\x00s1")
    assert seed_hash("m", None, None) == seed_hash("m", "", "")


def test_seed_differs_by_model_lora_and_salt() -> None:
    seeds = {seed_hash("a"), seed_hash("b"), seed_hash("a", "x"), seed_hash("a", None, "x")}
    assert len(seeds) == 4


def test_chain_matches_big_endian_xxh3_formula() -> None:
    tokens = [1, 2, 3, 70_000, 2**32 - 1, 0, 5, 6, 7, 8, 9, 10]
    seed = seed_hash("m")
    assert chain_hashes(LocalHash(seed), tokens, 4) == _reference_chain(seed, tokens, 4)


def test_chain_hashes_only_full_blocks() -> None:
    seed = LocalHash(7)
    assert chain_hashes(seed, list(range(10)), 4) == chain_hashes(seed, list(range(8)), 4)
    assert len(chain_hashes(seed, list(range(10)), 4)) == 2
    assert chain_hashes(seed, [1, 2, 3], 4) == []


def test_chain_continues_across_calls() -> None:
    tokens = list(range(100, 132))
    whole = chain_hashes(LocalHash(1), tokens, 8)
    first = chain_hashes(LocalHash(1), tokens[:16], 8)
    rest = chain_hashes(first[-1], tokens[16:], 8)
    assert first + rest == whole


def test_prompt_hashes_chain_from_the_seed() -> None:
    tokens = list(range(64))
    seed = seed_hash("m", "lora", "salt")
    assert prompt_hashes("m", "lora", tokens, 16, "salt") == _reference_chain(seed, tokens, 16)


def test_block_size_changes_every_hash() -> None:
    tokens = list(range(64))
    assert not set(prompt_hashes("m", None, tokens, 16)) & set(prompt_hashes("m", None, tokens, 32))


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "x"])
def test_token_ids_outside_uint32_raise_index_state_error(bad: object) -> None:
    with pytest.raises(IndexStateError, match="token_ids: expected ints"):
        pack_tokens([1, bad])  # type: ignore[list-item]


def test_non_positive_block_size_raises() -> None:
    with pytest.raises(IndexStateError, match="block_size"):
        chain_hashes(LocalHash(1), [1, 2], 0)


def test_pack_tokens_is_big_endian() -> None:
    assert pack_tokens([1, 0x01020304]) == b"\x00\x00\x00\x01\x01\x02\x03\x04"
