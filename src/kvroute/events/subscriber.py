"""One asyncio task per engine source that only moves bytes: SUB socket, connection monitor,
replay requests; every decision is its `SourceTracker`'s (events/tracker.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Final

import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvroute.core import (
    EventCounters,
    ReplayOutcome,
    ResetCause,
    SourceId,
    SourceSpec,
    SourceStatus,
)
from kvroute.errors import ConfigError, KvrouteError
from kvroute.events.replay import request_replay
from kvroute.events.tracker import RecoveryTimings, ReplayRequest, SourceTracker
from kvroute.index import PrefixIndex

__all__ = ["SubscriberManager"]

log = logging.getLogger("kvroute.events.subscriber")

# Messages handled per wake-up before going back to the poller, so one busy source cannot
# starve the other sources or the gateway sharing the loop.
_MAX_DRAIN: Final = 128
# Live messages the SUB socket may queue while we replay (ZMQ drops beyond it: a later gap).
_SUB_RCVHWM: Final = 100_000
_MONITOR_EVENTS: Final = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


class _Shared:
    """What every source task of one manager uses: context, replay deadline and slots."""

    def __init__(
        self, context: zmq.asyncio.Context, replay_timeout_s: float, max_concurrent_replays: int
    ) -> None:
        self.context = context
        self.replay_timeout_s = replay_timeout_s
        self.replay_slots = asyncio.Semaphore(max_concurrent_replays)


class _SourceTask:
    """The sockets of one source and the task that feeds what they receive to its tracker."""

    def __init__(self, tracker: SourceTracker, shared: _Shared) -> None:
        self.tracker = tracker
        self.spec = tracker.spec
        self.shared = shared
        self.sockets: tuple[zmq.asyncio.Socket, zmq.asyncio.Socket] | None = None
        self.added_at = time.monotonic()

    def open(self) -> None:
        """Create and connect the SUB socket and its monitor; a bad endpoint raises ConfigError."""
        src = self.spec.source
        sub = self.shared.context.socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, _SUB_RCVHWM)
            # libzmq retries a dead endpoint every 100 ms forever; back off to 1 s so a down
            # engine is not hammered (and on loopback, fewer connects can squat its port).
            sub.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            sub.setsockopt(zmq.SUBSCRIBE, self.spec.topic.encode())
            monitor = sub.get_monitor_socket(_MONITOR_EVENTS)
        except zmq.ZMQError as exc:
            sub.close(linger=0)
            raise ConfigError(f"source {src}: cannot open a SUB socket ({exc})") from exc
        try:
            sub.connect(self.spec.endpoint)
        except zmq.ZMQError as exc:
            self._close(sub, monitor)
            raise ConfigError(
                f"source {src}: endpoint: expected a ZeroMQ connect address like "
                f"tcp://host:5557, got {self.spec.endpoint!r} ({exc})"
            ) from exc
        self.sockets = (sub, monitor)

    @staticmethod
    def _close(sub: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        with contextlib.suppress(zmq.ZMQError):
            sub.disable_monitor()
        monitor.close(linger=0)
        sub.close(linger=0)

    async def run(self) -> None:
        """Wait for readability or the tracker's next timer; drain, hand over, run replays."""
        assert self.sockets is not None, "open() first"
        sub, monitor = self.sockets
        tracker = self.tracker
        try:
            raw: zmq.Socket[Any] = zmq.Socket.shadow(sub.underlying)
            poller = zmq.asyncio.Poller()
            poller.register(sub, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            while True:
                deadline = tracker.next_deadline()
                timeout_ms = None
                if deadline is not None:
                    timeout_ms = max(0, int((deadline - time.monotonic()) * 1000) + 1)
                ready = dict(await poller.poll(timeout_ms))
                try:
                    if monitor in ready:
                        await self._drain_monitor(monitor, raw)
                    if sub in ready:
                        await self._drain(raw)
                    await self._replays(tracker.tick())
                except Exception:
                    # A bug or an input we did not foresee must not end this source's task
                    # silently or leave half-known state: log it and start over.
                    log.exception(
                        "subscriber %s: unexpected error; resetting the source", self.spec.source
                    )
                    tracker.reset(ResetCause.RESYNC)
        finally:
            self.sockets = None
            self._close(sub, monitor)

    async def _drain_monitor(self, monitor: zmq.asyncio.Socket, raw: zmq.Socket[Any]) -> None:
        while True:
            try:
                frames = await monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(frames)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self.tracker.on_disconnect()
                # Whatever is still queued came from the engine we just lost.
                with contextlib.suppress(zmq.ZMQError):
                    while True:
                        raw.recv_multipart(zmq.NOBLOCK)
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                await self._replays(self.tracker.on_connect())

    async def _drain(self, raw: zmq.Socket[Any]) -> None:
        on_live = self.tracker.on_live
        for _ in range(_MAX_DRAIN):
            try:
                frames = raw.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or len(frames[1]) != 8:
                self.tracker.on_bad_frames()
                continue
            request = on_live(int.from_bytes(frames[1], "big"), frames[2])
            if request is not None:
                await self._replays(request)

    async def _replays(self, request: ReplayRequest | None) -> None:
        """Run the tracker's replay requests until it asks for no more."""
        endpoint = self.spec.replay_endpoint
        while request is not None:
            # The tracker settles a source's replays itself when it has no endpoint.
            assert endpoint is not None, f"{self.spec.source}: a replay without an endpoint"
            try:
                async with self.shared.replay_slots:
                    result = await request_replay(
                        self.shared.context,
                        endpoint,
                        request.start,
                        timeout_s=self.shared.replay_timeout_s,
                    )
            except KvrouteError as exc:
                log.debug("replay from %s failed: %s", endpoint, exc)
                request = self.tracker.on_replay_failed(request, ReplayOutcome.ERROR)
                continue
            request = self.tracker.on_replay(request, result.batches, result.complete)


class SubscriberManager:
    """Runs one subscriber task per source, each with its `SourceTracker`; sources come and go
    at runtime. Adding a source registers it with the index; removing it drops its blocks.

    Recovery policy: docs/design.md §5, coded in events/tracker.py. Retries of a stale source
    back off exponentially from `retry_backoff_s[0]` to `retry_backoff_s[1]`; a source quiet for
    `tail_check_s` is asked for anything after its last seq (0 disables).
    """

    def __init__(
        self,
        index: PrefixIndex,
        counters: EventCounters,
        *,
        context: zmq.asyncio.Context | None = None,
        replay_timeout_s: float,
        max_concurrent_replays: int,
        retry_backoff_s: tuple[float, float],
        tail_check_s: float,
    ) -> None:
        if max_concurrent_replays < 1:
            raise ConfigError(
                f"max_concurrent_replays: expected >= 1, got {max_concurrent_replays}"
            )
        self._index = index
        self._counters = counters
        self._timings = RecoveryTimings(retry_backoff_s[0], retry_backoff_s[1], tail_check_s)
        self._own_context = context is None
        self._context = context if context is not None else zmq.asyncio.Context()
        self._shared = _Shared(self._context, replay_timeout_s, max_concurrent_replays)
        self._sources: dict[SourceId, _SourceTask] = {}
        self._tasks: dict[SourceId, asyncio.Task[None]] = {}
        self._closed = False

    async def add_source(self, spec: SourceSpec) -> None:
        """Start subscribing to `spec` (replacing an existing source with the same id).

        Returns at once: the source runs as its own task. A malformed endpoint raises
        `ConfigError`; an unreachable one just stays disconnected until it comes up.
        """
        if self._closed:
            raise RuntimeError("SubscriberManager is closed")
        source = spec.source
        if source in self._sources:
            await self.remove_source(source)
        tracker = SourceTracker(spec, self._index, self._counters, self._timings, time.monotonic)
        task = _SourceTask(tracker, self._shared)
        task.open()
        self._index.add_source(source, engine=spec.engine, model=spec.model)
        self._sources[source] = task
        self._tasks[source] = asyncio.create_task(task.run(), name=f"kvroute-subscriber-{source}")

    async def remove_source(self, source: SourceId) -> None:
        """Stop the source's task and drop it, with what it held, from the index."""
        state = self._sources.pop(source, None)
        task = self._tasks.pop(source, None)
        if task is not None:
            await _cancel(task)
        if state is None:
            return
        self._index.remove_source(source)
        self._counters.reset(source, ResetCause.REMOVED)

    def status(self) -> list[SourceStatus]:
        return [state.tracker.status() for state in self._sources.values()]

    def unsettled(self, deadline_s: float) -> list[SourceId]:
        """Sources whose first bootstrap has not ended, added less than `deadline_s` ago (one
        that cannot even connect is given up on then): what readiness waits for."""
        now = time.monotonic()
        return [
            source
            for source, state in self._sources.items()
            if not state.tracker.settled and now - state.added_at < deadline_s
        ]

    def sources(self) -> list[SourceSpec]:
        return [state.spec for state in self._sources.values()]

    async def close(self) -> None:
        """Cancel every source task and close its sockets (linger 0); never hangs."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks.values())
        self._tasks.clear()
        self._sources.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._own_context:
            self._context.destroy(linger=0)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
