"""Where fleet membership comes from: the `FleetSource` seam and its fleet-file implementation."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from kvroute.errors import ConfigError
from kvroute.fleet.spec import EngineSpec, load_fleet_file

__all__ = ["FileFleetSource", "FleetSource"]

log = logging.getLogger(__name__)


class FleetSource(Protocol):
    """Something that knows which engines exist: the fleet file now, Kubernetes pods later.

    `watch()` yields the complete engine list whenever it may have changed; the Fleet diffs
    it against what it has, so yielding an unchanged list is harmless. A source handles its own
    errors (log and count, keep watching) and never yields an invalid list.
    """

    def watch(self) -> AsyncIterator[list[EngineSpec]]: ...


class FileFleetSource:
    """Polls the fleet file's mtime, size and inode every `interval_s`; yields it when it changed
    and validates. Each reload is counted in `reloads` by outcome ("ok", "error": the gateway
    exports it as `kvroute_fleet_reloads_total`); after an invalid file the previous fleet stays
    in force."""

    def __init__(
        self,
        path: Path,
        *,
        interval_s: float,
        reloads: collections.Counter[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._interval_s = interval_s
        self.reloads: collections.Counter[str] = (
            reloads if reloads is not None else collections.Counter()
        )
        self._last = self._stat()  # changes from here on are reported

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def watch(self) -> AsyncIterator[list[EngineSpec]]:
        while True:
            await asyncio.sleep(self._interval_s)
            current = self._stat()
            if current == self._last:
                continue
            self._last = current
            try:
                specs = load_fleet_file(self.path)
            except ConfigError as exc:
                log.warning("fleet file not reloaded, keeping the current fleet: %s", exc)
                self.reloads["error"] += 1
                continue
            self.reloads["ok"] += 1
            yield specs
