"""Speculative index entries: prompts just routed to an engine, counted until their events arrive
or their TTL passes (bounded per engine, expired entries dropped lazily)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from itertools import repeat

__all__ = ["SpeculativeEntries"]


class _Fifo:
    """One engine's entries in the order they were added: expiry times and local hashes in two
    parallel deques (extended a chain at a time, without a tuple per block)."""

    __slots__ = ("at", "local")

    def __init__(self) -> None:
        self.at: deque[float] = deque()
        self.local: deque[int] = deque()


class SpeculativeEntries:
    """Per engine, local hash -> expiry time, plus a FIFO of (expiry, hash) for cheap purging.

    `by_engine` is read directly by the index hot paths (match, confirming stores).
    """

    def __init__(self, ttl_s: float, max_per_engine: int, clock: Callable[[], float]) -> None:
        self.ttl_s = ttl_s
        self.max_per_engine = max_per_engine
        self._clock = clock
        self.by_engine: dict[str, dict[int, float]] = {}
        self._fifo: dict[str, _Fifo] = {}

    def add(self, engine: str, chains: Iterable[Iterable[int]]) -> None:
        """Add block hashes routed to `engine` now; the oldest entries go beyond the bound."""
        now = self._clock()
        expiry = now + self.ttl_s
        entries = self.by_engine.setdefault(engine, {})
        fifo = self._fifo.get(engine)
        if fifo is None:
            fifo = self._fifo[engine] = _Fifo()
        _purge(entries, fifo, now)
        for chain in chains:
            chain = chain if isinstance(chain, list) else list(chain)
            entries.update(dict.fromkeys(chain, expiry))
            fifo.local.extend(chain)
            fifo.at.extend(repeat(expiry, len(chain)))
        limit = self.max_per_engine
        while len(entries) > limit and fifo.at:
            at, local = fifo.at.popleft(), fifo.local.popleft()
            if entries.get(local) == at:
                del entries[local]
        if len(fifo.at) > 2 * limit + 1024:  # re-adds leave superseded FIFO items behind
            live = sorted((at, k) for k, at in entries.items())
            fifo.at = deque(at for at, _ in live)
            fifo.local = deque(k for _, k in live)

    def purge(self, now: float) -> None:
        """Drop every entry expired at `now`."""
        for engine, fifo in self._fifo.items():
            if fifo.at and fifo.at[0] <= now:
                _purge(self.by_engine[engine], fifo, now)


def _purge(entries: dict[int, float], fifo: _Fifo, now: float) -> None:
    at_q, local_q = fifo.at, fifo.local
    while at_q and at_q[0] <= now:
        at, local = at_q.popleft(), local_q.popleft()
        if entries.get(local) == at:
            del entries[local]
