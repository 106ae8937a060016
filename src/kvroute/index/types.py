"""Types the index shares with routing and the gateway: source ids, local hashes, match results."""

from __future__ import annotations

from typing import NewType

import msgspec

__all__ = ["LocalHash", "MatchResult", "SourceId", "source_id", "split_source_id"]

LocalHash = NewType("LocalHash", int)
"""Our own chained block hash (index/hashing.py); never an engine's hash."""

SourceId = NewType("SourceId", str)
"""One publishing engine source: ``"<engine>/<dp rank>"`` (also the `source` metric label)."""


def source_id(engine: str, rank: int) -> SourceId:
    return SourceId(f"{engine}/{rank}")


def split_source_id(source: SourceId) -> tuple[str, int]:
    engine, _, rank = source.rpartition("/")
    return engine, int(rank)


class MatchResult(msgspec.Struct, frozen=True, gc=False):
    """How much of a request's prompt one engine holds, as a contiguous prefix from block 0.

    `blocks`/`tokens` are confirmed by events; `by_medium` splits `blocks` per medium (a block
    held in several media counts for the best one: GPU, then CPU, then others).
    `speculative_blocks` is the contiguous prefix covered by unconfirmed routing decisions,
    reported apart and never added into `blocks`.
    """

    blocks: int = 0
    tokens: int = 0
    by_medium: dict[str, int] = msgspec.field(default_factory=dict)
    speculative_blocks: int = 0
    block_size: int = 0
