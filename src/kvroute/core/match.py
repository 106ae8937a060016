"""What the index answers for one engine and prompt: `MatchResult` (docs/architecture.md,
"Match result")."""

from __future__ import annotations

import msgspec

__all__ = ["MatchResult"]


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
