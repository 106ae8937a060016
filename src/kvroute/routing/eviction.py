"""Which engines are evicting: their pools full, so that a prefill there pushes cached blocks
out, as their KV events say."""

# vLLM (and src/kvroute/sim/block_pool.py) publishes BlockRemoved only when it reuses a cached
# block for a new one, i.e. when no unfilled block is left. An engine whose BlockRemoved count
# rose within the last `window_s` is evicting.

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Final

__all__ = ["DEFAULT_EVICTING_WINDOW_S", "EvictionRecency"]

DEFAULT_EVICTING_WINDOW_S: Final = 10.0
"""How long after its last BlockRemoved an engine still counts as evicting: a few requests'
time, so an engine that evicts now and then (a full pool, lightly loaded) keeps counting."""


class EvictionRecency:
    """Per engine, its applied BlockRemoved count as last seen and when it last rose."""

    def __init__(self, window_s: float = DEFAULT_EVICTING_WINDOW_S) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s: expected > 0, got {window_s}")
        self.window_s = window_s
        self._seen: dict[str, tuple[int, float | None]] = {}  # engine -> (count, rose at)

    def update(self, removed: Mapping[str, int], now: float | None = None) -> None:
        """The engines' BlockRemoved counts now (index.engine_removed_counts()). An engine's
        first count only sets the baseline: evictions before kvroute saw it prove nothing now."""
        now = time.monotonic() if now is None else now
        for engine, count in removed.items():
            seen = self._seen.get(engine)
            if seen is None:
                self._seen[engine] = (count, None)
            elif count != seen[0]:  # a source removed lowers it: a change, not a rise
                self._seen[engine] = (count, now if count > seen[0] else seen[1])

    def evicting(self, engine: str, now: float | None = None) -> bool:
        """Whether `engine` evicted within the last `window_s`."""
        seen = self._seen.get(engine)
        if seen is None or seen[1] is None:
            return False
        now = time.monotonic() if now is None else now
        return now - seen[1] <= self.window_s
