"""Sources that stay silent while their engine serves requests: a topic, endpoint or engine
setting that keeps events from arriving, flagged on /debug/engines, /metrics and in the log."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Final

from kvroute.core import SourceId, SourceStatus

__all__ = ["SilentSources"]

log = logging.getLogger("kvroute.gateway.silence")

_HINTS_CONNECTED: Final = (
    "its topic differs from the engine's (fleet `topic` vs the engine's kv_events_config "
    "`topic`), or the engine publishes no events (enable_kv_cache_events, prefix caching on)"
)
_HINTS_UNCONNECTED: Final = (
    "nothing publishes at its endpoint: the engine must bind (kv_events_config endpoint "
    "tcp://*:PORT) and kvroute connect to that host and port; check the address and firewall"
)


class SilentSources:
    """A source is silent when, for `after_s`, its SUB socket received nothing (or it never
    connected) although its engine answered requests: an engine that serves prompts stores
    blocks, and every store is an event. An idle engine's quiet is not flagged.

    `check()` compares each engine's served-request count with the count when its source went
    quiet for `after_s`; one served request more, `after_s / 2` old, flags the source (the
    request had time to make its event). Anything the source receives clears the flag.
    """

    def __init__(
        self,
        after_s: float,
        sources: Callable[[], Iterable[SourceStatus]],
        served: Callable[[str], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.after_s = after_s
        self._sources = sources
        self._served = served
        self._clock = clock
        self._base: dict[SourceId, int] = {}  # served count when the quiet passed after_s
        self._served_seen: dict[SourceId, float] = {}  # when a request past the base was seen
        self._silent: set[SourceId] = set()

    @property
    def interval_s(self) -> float:
        return max(0.05, min(5.0, self.after_s / 4))

    def silent(self) -> frozenset[SourceId]:
        return frozenset(self._silent)

    def check(self) -> None:
        now = self._clock()
        seen: set[SourceId] = set()
        for s in self._sources():
            key = s.source
            seen.add(key)
            served = self._served(s.engine)
            if s.quiet_s < self.after_s:
                self._base.pop(key, None)
                self._served_seen.pop(key, None)
                if key in self._silent:
                    self._silent.discard(key)
                    log.info("source %s is heard again", key, extra={"source": key})
                continue
            base = self._base.setdefault(key, served)
            if served <= base:
                continue
            first = self._served_seen.setdefault(key, now)
            if now - first >= self.after_s / 2 and key not in self._silent:
                self._silent.add(key)
                log.warning(
                    "source %s (%s) has received nothing for %.0f s while engine %s answered "
                    "%d request(s): routing ignores what that engine holds. Likely: %s",
                    key,
                    s.endpoint,
                    s.quiet_s,
                    s.engine,
                    served - base,
                    _HINTS_CONNECTED if s.connected else _HINTS_UNCONNECTED,
                    extra={"source": key, "engine": s.engine, "connected": s.connected},
                )
        for gone in set(self._base) - seen:
            del self._base[gone]
        for gone in set(self._served_seen) - seen:
            del self._served_seen[gone]
        self._silent &= seen

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.check()
