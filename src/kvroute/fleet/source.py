"""Where fleet membership comes from: the `FleetSource` seam and its fleet-file implementation."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from kvroute.errors import ConfigError
from kvroute.fleet.spec import EngineSpec, load_fleet_file
from kvroute.metrics import Metrics

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
    and validates. An invalid file is logged and counted (`kvroute_fleet_reloads_total{outcome=
    "error"}`) and the previous fleet stays in force."""

    def __init__(self, path: Path, interval_s: float = 2.0, *, metrics: Metrics | None = None):
        self.path = Path(path)
        self._interval_s = interval_s
        self._metrics = metrics
        self._last = self._stat()  # changes from here on are reported

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.fleet_reloads.labels(outcome=outcome).inc()

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
                self._count("error")
                continue
            self._count("ok")
            yield specs
