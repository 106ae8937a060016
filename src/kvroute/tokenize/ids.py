"""Token-id checks shared by the tokenizers: prompts given as ids, ids read back from an engine."""

from __future__ import annotations

from typing import Any

from kvroute.errors import TokenizeError

__all__ = ["require_token_ids"]


def require_token_ids(value: Any, what: str) -> list[int]:
    """`value` if it is a list of non-negative ints (bools are not ids), else TokenizeError."""
    if not isinstance(value, list):
        raise TokenizeError(f"{what}: expected a list of token ids, got {type(value).__name__}")
    for t in value:
        if type(t) is not int or t < 0:
            raise TokenizeError(
                f"{what}: expected a list of token ids, got an item {type(t).__name__} {t!r:.40}"
            )
    return value
