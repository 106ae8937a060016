"""A speculative claim one replica shares with the others (fleet/shared_state.py), without
needing the `shared` extra to name it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SpeculativeClaim"]


@dataclass(frozen=True, slots=True)
class SpeculativeClaim:
    """A prompt one replica just sent to `engine`: its blocks, for the speculative TTL."""

    engine: str
    model: str
    lora: str | None
    token_ids: list[int]
    cache_salt: str | None
