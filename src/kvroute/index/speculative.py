"""Speculative index entries: prompts just routed to an engine, counted until their events arrive
or their TTL passes (bounded per engine, expired entries dropped lazily)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

__all__ = ["SpeculativeEntries"]


class SpeculativeEntries:
    """Per engine, local hash -> expiry time, plus a FIFO of (expiry, hash) for cheap purging.

    `by_engine` is read directly by the index hot paths (match, confirming stores).
    """

    def __init__(self, ttl_s: float, max_per_engine: int, clock: Callable[[], float]) -> None:
        self.ttl_s = ttl_s
        self.max_per_engine = max_per_engine
        self._clock = clock
        self.by_engine: dict[str, dict[int, float]] = {}
        self._fifo: dict[str, deque[tuple[float, int]]] = {}

    def add(self, engine: str, chains: Iterable[Iterable[int]]) -> None:
        """Add block hashes routed to `engine` now; the oldest entries go beyond the bound."""
        now = self._clock()
        expiry = now + self.ttl_s
        entries = self.by_engine.setdefault(engine, {})
        fifo = self._fifo.setdefault(engine, deque())
        _purge(entries, fifo, now)
        for chain in chains:
            for local in chain:
                entries[local] = expiry
                fifo.append((expiry, local))
        limit = self.max_per_engine
        while len(entries) > limit and fifo:
            at, local = fifo.popleft()
            if entries.get(local) == at:
                del entries[local]
        if len(fifo) > 2 * limit + 1024:  # re-adds leave superseded FIFO items behind
            self._fifo[engine] = deque(sorted((at, k) for k, at in entries.items()))

    def purge(self, now: float) -> None:
        """Drop every entry expired at `now`."""
        for engine, fifo in self._fifo.items():
            if fifo and fifo[0][0] <= now:
                _purge(self.by_engine[engine], fifo, now)


def _purge(entries: dict[int, float], fifo: deque[tuple[float, int]], now: float) -> None:
    while fifo and fifo[0][0] <= now:
        at, local = fifo.popleft()
        if entries.get(local) == at:
            del entries[local]
