"""Token-id checks shared by the tokenizers: prompts given as ids, ids read back from an engine."""

from __future__ import annotations

from typing import Any

from kvroute.errors import TokenizeError

__all__ = ["require_token_ids"]

_ID_LIMIT = 1 << 32


def require_token_ids(value: Any, what: str) -> list[int]:
    """`value` if it is a list of ints in [0, 2**32) (bools are not ids; the index packs ids as
    4-byte unsigned ints), else TokenizeError."""
    if not isinstance(value, list):
        raise TokenizeError(f"{what}: expected a list of token ids, got {type(value).__name__}")
    for t in value:
        if type(t) is not int or not 0 <= t < _ID_LIMIT:
            raise TokenizeError(
                f"{what}: expected a list of token ids, got an item {type(t).__name__} {t!r:.40}"
            )
    return value
