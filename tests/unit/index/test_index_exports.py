"""kvroute.index exports exactly its documented surface (STYLE.md §15)."""

from __future__ import annotations

import kvroute.index


def test_index_all_lists_the_public_names() -> None:
    assert sorted(kvroute.index.__all__) == [
        "GPU",
        "IndexLimits",
        "LocalHash",
        "MatchResult",
        "PrefixIndex",
        "SourceId",
        "chain_hashes",
        "pack_tokens",
        "prompt_hashes",
        "seed_hash",
        "source_id",
        "split_source_id",
    ]
    for name in kvroute.index.__all__:
        assert getattr(kvroute.index, name) is not None
