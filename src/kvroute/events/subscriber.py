"""One asyncio task per engine source that only moves bytes: SUB socket, connection monitor,
replay requests; every decision is its `SourceTracker`'s (events/tracker.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Final, TypeAlias

import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvroute.core import (
    EventCounters,
    IngestLimits,
    ReplayOutcome,
    ResetCause,
    SourceId,
    SourceSpec,
    SourceStatus,
)
from kvroute.errors import ConfigError, KvrouteError
from kvroute.events.budget import IngestBudget
from kvroute.events.curve import CurveClientKeys, CurveKeyPair, check_curve_key, curve_client
from kvroute.events.native_receive import Drain, ReceiveImpl, native_drain
from kvroute.events.replay import request_replay
from kvroute.events.tracker import RecoveryTimings, ReplayRequest, SourceTracker
from kvroute.index import PrefixIndex
from kvroute.index.export import SourceExport

__all__ = ["SourceRestore", "SubscriberManager"]

# A source's blocks from a snapshot: its last applied seq, that batch's digest, its blocks.
SourceRestore: TypeAlias = tuple[int, bytes, SourceExport]

log = logging.getLogger("kvroute.events.subscriber")

# Messages handled per wake-up before yielding to the event loop, and the time they may take,
# so one busy (or flooding) source cannot starve the other sources or the gateway sharing the
# loop: a request needs a few turns of the loop, each costs at most one slice per source.
_MAX_DRAIN: Final = 128
# Messages the native receive loop reads per call (events/_recv.c): fewer calls, yet a small
# backlog to hold when a slice ends mid-batch.
_NATIVE_BATCH: Final = 32
_DRAIN_SLICE_S: Final = 0.002
# Live messages the SUB socket may queue while we replay (ZMQ drops beyond it: a later gap).
_SUB_RCVHWM: Final = 100_000
# A failed handshake (CURVE: no key, a wrong key, a server without the secret) is counted and
# retried after a backoff: libzmq gives up on some (a mechanism mismatch), retries others at once.
_HANDSHAKE_FAILED: Final = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_MONITOR_EVENTS: Final = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | _HANDSHAKE_FAILED
_NOBLOCK: Final = int(zmq.NOBLOCK)  # a plain int: pyzmq need not convert a flag per call


DEFAULT_COALESCE_S = 0.0
"""`ingest_coalesce_ms` (settings.py) in seconds: wake-ups closer than this are merged (off:
asyncio's timers round a window up to ~1 ms, which costs more latency than it saves CPU at
most fleets' rates; design §12)."""


class _Shared:
    """What every source task of one manager uses: context, replay deadline and slots, and the
    largest message a socket takes."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        replay_timeout_s: float,
        max_concurrent_replays: int,
        max_message_bytes: int,
        max_replay: tuple[int, int],
        counters: EventCounters,
        retry_backoff_s: tuple[float, float],
        drain: Drain | None,
        coalesce_s: float = 0.0,
    ) -> None:
        self.context = context
        self.drain = drain  # the native receive loop (events/_recv.c), or None: pyzmq's calls
        # Wake-ups closer together than this are merged: the next drain waits out the window
        # (design §12, "Coalescing wake-ups"); 0: drain on every wake-up.
        self.coalesce_s = coalesce_s
        self.counters = counters
        self.retry_backoff_s = retry_backoff_s
        self.max_replay_batches, self.max_replay_bytes = max_replay
        self.replay_timeout_s = replay_timeout_s
        self.replay_slots = asyncio.Semaphore(max_concurrent_replays)
        # Sources whose last replay did not end (silent, slow, endless or broken servers)
        # share one slot of their own, so they cannot hold every slot and keep the honest
        # sources' gap repairs waiting (docs/design.md §16).
        self.slow_slots = asyncio.Semaphore(1)
        self.max_message_bytes = max_message_bytes


class _SourceTask:
    """The sockets of one source and the task that feeds what they receive to its tracker.

    The task waits on the two sockets' file descriptors (`loop.add_reader`, registered once) and
    one timer for the tracker's next deadline, then drains with non-blocking receives, one
    `recv` per frame: no poller, futures or reader registration per wake-up
    (docs/notes/issue-12-profile.md, "The per-message path, cut").

    ZeroMQ's descriptors are edge-like: one becomes readable when its socket's state changed and
    stays so until the socket is next used, whether or not a message is left. So a socket marked
    ready is drained until EAGAIN (only then does the descriptor speak for it again), and a
    descriptor that fires while nobody waits (the task is inside a replay) is unregistered until
    the next wait, so the loop does not spin on it.
    """

    def __init__(
        self, tracker: SourceTracker, shared: _Shared, curve: CurveClientKeys | None = None
    ) -> None:
        self.tracker = tracker
        self.spec = tracker.spec
        self.shared = shared
        self.curve = curve  # CURVE client keys of this source (its server key), or None
        self._handshake_failures = 0  # in a row: the reconnect backoff grows with it
        self._reconnect_due = False
        self._reconnect_timer: asyncio.TimerHandle | None = None
        self.sockets: tuple[zmq.asyncio.Socket, zmq.asyncio.Socket] | None = None
        self.added_at = time.monotonic()
        # Set by the descriptor callbacks, cleared once drained to EAGAIN.
        self._sub_ready = True
        self._monitor_ready = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fds: tuple[int, int] | None = None  # (SUB, monitor) while registered
        self._waiter: asyncio.Future[None] | None = None
        self._coalescing = False  # inside `_pause`: a descriptor that fires only marks ready
        self._drained_at = -1.0  # when the last drain that took messages ended (perf_counter)
        self._took = False  # the last drain that emptied the socket took messages
        self._paused = False  # the last drain followed a `_coalesce` pause
        self.pauses = 0  # `_coalesce` pauses taken (tests/zmq/events/test_subscriber_receive.py)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when `_timer` fires, on the tracker's (monotonic) clock
        self.slow = False  # its last replay did not end: it waits for the slow slot
        # Disconnected: what is still queued came from the engine just lost; `_drain` throws it
        # away (a slice a turn, not all at once: a flooding source queues 100,000 messages),
        # then connects afresh.
        self._discarding = False
        # Received by the native loop but not yet handed over (a slice ended mid-batch): the
        # messages, and the position of the next one.
        self._received: list[tuple[int, bytes] | None] = []
        self._received_at = 0

    def open(self) -> None:
        """Create and connect the SUB socket and its monitor; a bad endpoint raises ConfigError."""
        src = self.spec.source
        sub = self.shared.context.socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, _SUB_RCVHWM)
            if self.shared.max_message_bytes:
                # Refused by libzmq before it allocates: the connection is closed, the
                # monitor reports it, and the source starts over (events/tracker.py).
                sub.setsockopt(zmq.MAXMSGSIZE, self.shared.max_message_bytes)
            # libzmq retries a dead endpoint every 100 ms forever; back off to 1 s so a down
            # engine is not hammered (and on loopback, fewer connects can squat its port).
            sub.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            sub.setsockopt(zmq.SUBSCRIBE, self.spec.topic.encode())
            if self.curve is not None:
                curve_client(sub, self.curve)
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
        """Wait for a readable socket or the tracker's next timer; drain, hand over, run replays."""
        assert self.sockets is not None, "open() first"
        sub, monitor = self.sockets
        tracker = self.tracker
        self._loop = loop = asyncio.get_running_loop()
        try:
            # Plain (blocking-API) views of the same sockets: their calls return at once.
            raw: zmq.Socket[Any] = zmq.Socket.shadow(sub.underlying)
            raw_monitor: zmq.Socket[Any] = zmq.Socket.shadow(monitor.underlying)
            fds = (_fd(raw), _fd(raw_monitor))
            loop.add_reader(fds[0], self._on_sub)
            loop.add_reader(fds[1], self._on_monitor)
            self._fds = fds
            while True:
                try:
                    if self._monitor_ready:
                        self._monitor_ready = False
                        await self._drain_monitor(raw_monitor, raw)
                    if self._reconnect_due:
                        self._reconnect_due = False
                        self._reconnect(raw)
                    if self._sub_ready and self._discarding:
                        self._sub_ready = self._discard(raw, time.perf_counter() + _DRAIN_SLICE_S)
                    elif self._sub_ready:
                        self._sub_ready = await (
                            self._drain(raw)
                            if self.shared.drain is None
                            else self._drain_native(self.shared.drain, raw)
                        )
                        if not self._sub_ready and self.shared.coalesce_s:
                            await self._coalesce(self.shared.coalesce_s)
                    await self._replays(tracker.tick())
                except Exception:
                    # A bug or an input we did not foresee must not end this source's task
                    # silently or leave half-known state: log it and start over.
                    log.exception(
                        "subscriber %s: unexpected error; resetting the source", self.spec.source
                    )
                    tracker.reset(ResetCause.RESYNC)
                if self._sub_ready or self._monitor_ready:
                    await asyncio.sleep(0)  # more may be queued: let the others run first
                elif tracker.idle():
                    # Index upkeep left: a slice per turn of the loop. A descriptor that fires
                    # meanwhile is unregistered (nobody waits), so look at both sockets next.
                    self._sub_ready = self._monitor_ready = True
                    await asyncio.sleep(0)
                else:
                    await self._wait(tracker.next_deadline(), fds)
        finally:
            self._unregister()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._reconnect_timer is not None:
                self._reconnect_timer.cancel()
                self._reconnect_timer = None
            self.sockets = None
            self._close(sub, monitor)

    # --- waiting ----------------------------------------------------------------------------

    async def _wait(self, deadline: float | None, fds: tuple[int, int]) -> None:
        """Until a descriptor fires or `deadline` (tracker clock) passes."""
        loop = self._loop
        assert loop is not None
        if self._fds is None:  # unregistered while nobody waited
            loop.add_reader(fds[0], self._on_sub)
            loop.add_reader(fds[1], self._on_monitor)
            self._fds = fds
        if deadline is not None:
            at = deadline + 0.001  # past the deadline, so `tick` finds it due
            timer = self._timer
            # One timer, rescheduled only to fire earlier: firing early costs one empty pass
            # (the tail-check deadline moves later with every batch).
            if timer is None or self._timer_at > at:
                if timer is not None:
                    timer.cancel()
                self._timer = loop.call_later(max(0.0, at - time.monotonic()), self._on_timer)
                self._timer_at = at
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _on_sub(self) -> None:
        self._sub_ready = True
        self._wake()

    def _on_monitor(self) -> None:
        self._monitor_ready = True
        self._wake()

    async def _coalesce(self, window: float) -> None:
        """The socket is empty. When this drain took messages less than `window` after the
        one before it, or follows a pause, messages come faster than one per window: wait the
        window out, so the next drain reads what arrives meanwhile in one go instead of one
        wake-up per message. A drain that finds nothing ends that; an engine at a calm rate
        never waits. Adds up to `window` to a message's latency, rounded up to asyncio's timer
        granularity (~1 ms), and never more wake-ups than messages."""
        if not self._took:
            self._paused = False  # a wake-up for nothing, or a quiet window: wait for the socket
            return
        now = time.perf_counter()
        recent = self._paused or now - self._drained_at < window
        self._drained_at = now
        if not recent:
            return
        loop = self._loop
        assert loop is not None
        self.pauses += 1
        pause = loop.create_future()
        timer = loop.call_later(window, pause.set_result, None)
        self._coalescing = True
        try:
            await pause
        finally:
            self._coalescing = False
            timer.cancel()
        self._paused = True
        self._sub_ready = self._monitor_ready = True  # what fired meanwhile, looked at next

    def _wake(self) -> None:
        if self._coalescing:
            return  # `_coalesce` looks at both sockets when its window ends
        waiter = self._waiter
        if waiter is None:
            # The task is busy (a replay): the descriptor stays readable until its socket is
            # drained, so stop the loop from calling back until the next wait.
            self._unregister()
        elif not waiter.done():
            waiter.set_result(None)

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _unregister(self) -> None:
        fds, self._fds = self._fds, None
        if fds is not None and self._loop is not None:
            self._loop.remove_reader(fds[0])
            self._loop.remove_reader(fds[1])

    # --- draining ---------------------------------------------------------------------------

    async def _drain_monitor(self, monitor: zmq.Socket[Any], raw: zmq.Socket[Any]) -> None:
        while True:
            try:
                frames = monitor.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(frames)["event"]
            if event & _HANDSHAKE_FAILED:
                # The connection never came up: the source stays disconnected, and the
                # DISCONNECTED that follows reconnects later, not at once.
                self._handshake_failures += 1
                self.shared.counters.handshake_failures[self.spec.source] += 1
                # The first of a run is a warning; its retries (every backoff) only debug.
                log.log(
                    logging.WARNING if self._handshake_failures == 1 else logging.DEBUG,
                    "subscriber %s: handshake with %s failed (%s); a CURVE key mismatch?",
                    self.spec.source,
                    self.spec.endpoint,
                    zmq.Event(event).name,
                )
            elif event == zmq.EVENT_DISCONNECTED and self._handshake_failures:
                with contextlib.suppress(zmq.ZMQError):
                    raw.disconnect(self.spec.endpoint)  # libzmq would retry every 100 ms
                self._reconnect_later()
            elif event == zmq.EVENT_DISCONNECTED:
                self.tracker.on_disconnect()
                self._discarding = self._sub_ready = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshake_failures = 0
                await self._replays(self.tracker.on_connect())

    def _reconnect_later(self) -> None:
        """Reconnect after the retry backoff (grown with each failed handshake in a row)."""
        if self._reconnect_timer is not None or self._loop is None:
            return
        low, high = self.shared.retry_backoff_s
        delay = min(high, low * 2 ** min(self._handshake_failures - 1, 30))
        self._reconnect_timer = self._loop.call_later(delay, self._on_reconnect_timer)

    def _on_reconnect_timer(self) -> None:
        self._reconnect_timer = None
        self._reconnect_due = True
        self._on_timer_wake()

    def _on_timer_wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _reconnect(self, raw: zmq.Socket[Any]) -> None:
        """Connect afresh. libzmq reconnects by itself after a lost connection, but not after a
        protocol error, such as a message over MAXMSGSIZE: that endpoint would stay silent
        for good (pinned by tests/zmq/events/test_subscriber_limits.py)."""
        endpoint = self.spec.endpoint
        with contextlib.suppress(zmq.ZMQError):
            raw.disconnect(endpoint)
        try:
            raw.connect(endpoint)
        except zmq.ZMQError as exc:  # it connected before: only a libzmq failure gets here
            log.warning(
                "subscriber %s: cannot reconnect to %s: %s", self.spec.source, endpoint, exc
            )

    async def _drain(self, raw: zmq.Socket[Any]) -> bool:
        """Hand up to `_MAX_DRAIN` live messages (or `_DRAIN_SLICE_S` of them) to the tracker;
        False once the socket is empty.

        One `recv(copy=False)` per frame: the frame says whether another part follows, where
        `recv_multipart` asks the socket (a getsockopt through an enum) after every part. The
        parts of a message arrive together, so only the first `recv` can find nothing.
        """
        recv = raw.recv
        tracker = self.tracker
        on_live = tracker.on_live
        clock = time.perf_counter
        until = clock() + _DRAIN_SLICE_S
        heard = False
        for _ in range(_MAX_DRAIN):
            if clock() > until:
                return True  # more may be queued: the caller yields, then drains again
            try:
                topic = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                self._took = heard
                return False
            if not heard:
                heard = True
                tracker.heard()
            if not topic.more:
                tracker.on_bad_frames()  # one frame
                continue
            seq = recv(_NOBLOCK, copy=False)
            if not seq.more:
                tracker.on_bad_frames()  # two frames
                continue
            payload = recv(_NOBLOCK, copy=False)
            if payload.more or len(seq) != 8:
                while payload.more:  # four or more frames: skip to the next message
                    payload = recv(_NOBLOCK, copy=False)
                tracker.on_bad_frames()
                continue
            request = on_live(int.from_bytes(seq.bytes, "big"), payload.bytes)
            if request is not None:
                await self._replays(request)
        return True

    async def _drain_native(self, drain: Drain, raw: zmq.Socket[Any]) -> bool:
        """`_drain` over the native receive loop: the same messages, boundaries and counts
        (tests/zmq/events/test_subscriber_receive.py runs both), read `_NATIVE_BATCH` at a
        time; what a slice leaves unhandled is handed over first next time."""
        tracker = self.tracker
        on_live = tracker.on_live
        on_live_run = tracker.on_live_run
        clock = time.perf_counter
        until = clock() + _DRAIN_SLICE_S
        handle = raw.underlying
        received = self._received
        at = self._received_at
        taken = 0
        while True:
            if at >= len(received):
                if taken >= _MAX_DRAIN:
                    self._received_at = at
                    return True
                received.clear()
                at = 0
                status = drain(handle, _NATIVE_BATCH, received)
                if status < 0:
                    self._received_at = 0
                    raise zmq.ZMQError(-status)
                if not received:
                    self._received_at = 0
                    self._took = taken > 0
                    return False
                if not taken:
                    tracker.heard()
                taken += len(received)
            # The common run of the slice as one index batch; what it leaves, one by one.
            ran = on_live_run(received, at)
            if ran == at:
                item = received[at]
                at += 1
                if item is None:
                    tracker.on_bad_frames()
                else:
                    request = on_live(item[0], item[1])
                    if request is not None:
                        self._received_at = at
                        await self._replays(request)
            else:
                at = ran
            if clock() > until:
                self._received_at = at
                return True

    def _discard(self, raw: zmq.Socket[Any], until: float) -> bool:
        """Throw away what the lost connection left queued, until `until`; then connect
        afresh. True while more may be queued."""
        self._received.clear()  # received from that connection, not handed over yet
        self._received_at = 0
        with contextlib.suppress(zmq.ZMQError):  # Again: empty
            while time.perf_counter() <= until:
                raw.recv(_NOBLOCK, copy=False)
            return True
        self._discarding = False
        self._reconnect(raw)
        return False

    async def _replays(self, request: ReplayRequest | None) -> None:
        """Run the tracker's replay requests until it asks for no more."""
        endpoint = self.spec.replay_endpoint
        while request is not None:
            # The tracker settles a source's replays itself when it has no endpoint.
            assert endpoint is not None, f"{self.spec.source}: a replay without an endpoint"
            slots = self.shared.slow_slots if self.slow else self.shared.replay_slots
            try:
                async with slots:
                    result = await request_replay(
                        self.shared.context,
                        endpoint,
                        request.start,
                        curve=self.curve,
                        timeout_s=self.shared.replay_timeout_s,
                        max_message_bytes=self.shared.max_message_bytes,
                        max_batches=self.shared.max_replay_batches,
                        max_bytes=self.shared.max_replay_bytes,
                    )
            except KvrouteError as exc:
                log.debug("replay from %s failed: %s", endpoint, exc)
                self.slow = True
                request = self.tracker.on_replay_failed(request, ReplayOutcome.ERROR)
                continue
            self.slow = not result.complete
            if result.truncated:
                log.debug(
                    "replay from %s for %s cut at %d batches",
                    endpoint,
                    self.spec.source,
                    len(result.batches),
                )
            request = self.tracker.on_replay(
                request, result.batches, result.complete, result.truncated
            )


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
        ingest_limits: IngestLimits | None = None,
        max_message_bytes: int = 0,
        max_replay: tuple[int, int] = (0, 0),
        curve_keys: CurveKeyPair | None = None,
        receive_impl: ReceiveImpl = "auto",
        coalesce_s: float = DEFAULT_COALESCE_S,
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
        self._shared = _Shared(
            self._context,
            replay_timeout_s,
            max_concurrent_replays,
            max(0, max_message_bytes),
            (max(0, max_replay[0]), max(0, max_replay[1])),
            counters,
            retry_backoff_s,
            native_drain(receive_impl),
            max(0.0, coalesce_s),
        )
        # This gateway's CURVE key pair: sources with a `curve_server_key` connect with it.
        self._curve_keys = curve_keys
        # Every source's budget shares the process-wide buckets of this one (events/budget.py).
        self._budget = IngestBudget(
            ingest_limits if ingest_limits is not None else IngestLimits(), time.monotonic
        )
        self._sources: dict[SourceId, _SourceTask] = {}
        self._tasks: dict[SourceId, asyncio.Task[None]] = {}
        self._closed = False

    async def add_source(self, spec: SourceSpec, restore: SourceRestore | None = None) -> None:
        """Start subscribing to `spec` (replacing an existing source with the same id).

        Returns at once: the source runs as its own task. A malformed endpoint raises
        `ConfigError`; an unreachable one just stays disconnected until it comes up.
        `restore`: blocks of this source from a snapshot (persist/index_snapshot.py), put back
        unconfirmed (events/tracker.py `restore`); ignored without a replay endpoint.
        """
        if self._closed:
            raise RuntimeError("SubscriberManager is closed")
        source = spec.source
        curve = self._curve_for(spec)
        if source in self._sources:
            await self.remove_source(source)
        tracker = SourceTracker(
            spec,
            self._index,
            self._counters,
            self._timings,
            time.monotonic,
            budget=self._budget.for_source(),
        )
        task = _SourceTask(tracker, self._shared, curve)
        task.open()
        self._index.add_source(source, engine=spec.engine, model=spec.model)
        if restore is not None and spec.replay_endpoint is not None:
            last, digest, export = restore
            self._index.restore_source(source, export)
            tracker.restore(last, digest)
        self._sources[source] = task
        self._tasks[source] = asyncio.create_task(task.run(), name=f"kvroute-subscriber-{source}")

    def _curve_for(self, spec: SourceSpec) -> CurveClientKeys | None:
        """The CURVE client keys of `spec`, or None (plain); ConfigError when it names a server
        key but this gateway has no key pair, or the key is malformed."""
        if spec.curve_server_key is None:
            return None
        if self._curve_keys is None:
            raise ConfigError(
                f"source {spec.source}: curve_server_key is set, but the gateway has no CURVE "
                "key pair (set curve_secret_key_file and curve_public_key_file)"
            )
        server_key = check_curve_key(
            spec.curve_server_key, f"source {spec.source}: curve_server_key"
        )
        return CurveClientKeys(self._curve_keys, server_key)

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

    def snapshot_sources(self) -> list[tuple[SourceSpec, int, bytes, SourceExport]]:
        """What a snapshot keeps: per consistent source with a replay endpoint, its spec, last
        seq, that batch's digest and its exported blocks (runs in the snapshot writer's child
        process, persist/writer.py: the export's copy is not the event loop's)."""
        out: list[tuple[SourceSpec, int, bytes, SourceExport]] = []
        for source, state in self._sources.items():
            recovery = state.tracker.recovery_state()
            export = self._index.export_source(source) if recovery is not None else None
            if recovery is not None and export is not None:
                out.append((state.spec, recovery[0], recovery[1], export))
        return out

    def unconfirmed(self) -> list[SourceId]:
        """Sources restored from a snapshot that their engine has not confirmed yet."""
        return [s for s, state in self._sources.items() if state.tracker.unconfirmed]

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


def _fd(sock: zmq.Socket[Any]) -> int:
    """The file descriptor ZeroMQ signals on when `sock` may have something to read."""
    fd = sock.get(zmq.FD)
    assert isinstance(fd, int)
    return fd


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
