"""Writing snapshots without stalling the event loop: a forked child serialises the index from
its copy-on-write view of memory and writes the file; the loop only pays for the fork."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvroute.persist.errors import SnapshotError
from kvroute.persist.index_snapshot import SnapshotSource, fleet_identity, snapshot_sections
from kvroute.persist.snapshot_file import SnapshotInfo, write_snapshot

__all__ = ["SnapshotStats", "SnapshotWriter"]

log = logging.getLogger(__name__)

_CHILD_FAILED = 3  # the child's exit status when the write failed (it logs nothing itself)


@dataclass(slots=True)
class SnapshotStats:
    """What /metrics shows of snapshot writing (metrics.py reads it at scrape time)."""

    written: int = 0
    failed: int = 0
    last_bytes: int = 0
    last_write_s: float = 0.0  # fork to file in place, in the child
    last_pause_s: float = 0.0  # the fork itself: how long the event loop stood still
    max_pause_s: float = 0.0
    last_written_at: float | None = None  # time.time() of the last good write


class SnapshotWriter:
    """Writes `collect()` to `path` every `interval_s` (0: only on `write_now`) from a forked
    child, one write at a time. Why a fork and not slices on the loop: the index must be seen at
    one instant with each source's last seq (docs/design.md §14), and serialising 10^7 blocks
    takes ~100 ms; a fork is a few ms, and the child's copy-on-write view is that instant."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fleet: str,
        collect: Callable[[], list[SnapshotSource]],
        interval_s: float,
    ) -> None:
        self.path = Path(path)
        self._fleet = fleet
        self._collect = collect
        self._interval_s = interval_s
        self.stats = SnapshotStats()
        self._busy = False

    def write_now(self) -> bool:
        """Write in this process, blocking (graceful shutdown: nothing else runs any more)."""
        started = time.perf_counter()
        try:
            info = self._write()
        except (SnapshotError, OSError) as exc:
            self.stats.failed += 1
            log.warning("snapshot %s not written: %s", self.path, exc)
            return False
        self._done(info.bytes_written, time.perf_counter() - started)
        return True

    def _write(self) -> SnapshotInfo:
        return write_snapshot(
            self.path,
            fleet=fleet_identity(self._fleet),
            sections=snapshot_sections(self._collect()),
        )

    async def write_in_child(self) -> bool:
        """Fork; the child writes the snapshot and exits; wait for it without blocking."""
        if self._busy:
            return False
        self._busy = True
        try:
            return await self._fork_and_wait()
        finally:
            self._busy = False

    async def _fork_and_wait(self) -> bool:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: no event loop, no sockets, no logging; just the file
            status = _CHILD_FAILED
            try:
                self._write()
                status = 0
            finally:
                os._exit(status)
        pause = time.perf_counter() - started
        self.stats.last_pause_s = pause
        self.stats.max_pause_s = max(self.stats.max_pause_s, pause)
        status = await _wait_child(loop, pid)
        elapsed = time.perf_counter() - started
        if status != 0:
            self.stats.failed += 1
            log.warning(
                "snapshot %s not written (the writer exited with status %s); the previous one is "
                "kept",
                self.path,
                status,
            )
            return False
        try:
            size = self.path.stat().st_size
        except OSError:
            size = 0
        self._done(size, elapsed)
        return True

    def _done(self, size: int, seconds: float) -> None:
        self.stats.written += 1
        self.stats.last_bytes = size
        self.stats.last_write_s = seconds
        self.stats.last_written_at = time.time()
        log.debug("snapshot %s written: %d bytes in %.3f s", self.path, size, seconds)

    async def run(self) -> None:
        """Write every `interval_s` until cancelled."""
        if self._interval_s <= 0:
            return
        while True:
            await asyncio.sleep(self._interval_s)
            await self.write_in_child()


async def _wait_child(loop: asyncio.AbstractEventLoop, pid: int) -> int:
    """The exit status of child `pid`, awaited on a pidfd (no thread, no SIGCHLD handler)."""
    fd = os.pidfd_open(pid)
    done = loop.create_future()

    def exited() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, exited)
    try:
        await done
    except asyncio.CancelledError:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
