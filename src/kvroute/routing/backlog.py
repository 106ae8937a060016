"""Prefill tokens routed to each engine and not yet computed, as a fluid queue that drains at
the engine's prefill speed: the queueing part of kv_aware's predicted time to first token."""

from __future__ import annotations

import time
from typing import Final

__all__ = ["DEFAULT_PREFILL_TOK_PER_S", "PrefillBacklog"]

DEFAULT_PREFILL_TOK_PER_S: Final = 16_000.0
"""An 8B model on one H100-class GPU, as the simulator's engines default to (sim/engine.py)."""


class PrefillBacklog:
    """Per engine, the uncached prompt tokens sent there minus what `tokens_per_s` has computed
    since (never below zero).

    An engine computes the waiting prompts' uncached tokens step after step, each step longer by
    its prefill tokens over the engine's prefill speed (src/kvroute/sim/scheduler.py; vLLM's
    scheduler budgets steps by tokens the same way), so a new request's first token waits for
    roughly this backlog plus its own uncached prompt.
    """

    def __init__(self, tokens_per_s: float = DEFAULT_PREFILL_TOK_PER_S) -> None:
        if not tokens_per_s > 0:
            raise ValueError(f"tokens_per_s: expected > 0, got {tokens_per_s}")
        self.tokens_per_s = tokens_per_s
        self._level: dict[str, tuple[float, float]] = {}  # engine -> (tokens, as of)

    def pending(self, engine: str, now: float | None = None) -> float:
        """Tokens still queued for prefill at `engine` (0 for an engine never sent any)."""
        entry = self._level.get(engine)
        if entry is None:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, at = entry
        return max(0.0, tokens - self.tokens_per_s * max(0.0, now - at))

    def add(self, engine: str, tokens: float, now: float | None = None) -> None:
        """`tokens` uncached prompt tokens were just sent to `engine`."""
        now = time.monotonic() if now is None else now
        self._level[engine] = (self.pending(engine, now) + max(0.0, tokens), now)

    def clear(self, engine: str) -> None:
        """Nothing is queued at `engine` (it has no request in flight, or it left the fleet)."""
        self._level.pop(engine, None)
