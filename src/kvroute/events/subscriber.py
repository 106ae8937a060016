"""One asyncio task per engine source: SUB socket, seq tracking, replay, resets and staleness.
Applies decoded batches with `PrefixIndex.apply` synchronously on the loop; counts every outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvroute.errors import ConfigError, KvrouteError, WireError
from kvroute.events.replay import request_replay
from kvroute.events.wire import AllBlocksCleared, BatchDecoder, EventBatch
from kvroute.index.types import SourceId, split_source_id
from kvroute.metrics import DropReason, Metrics, ReplayOutcome, ResetCause

if TYPE_CHECKING:
    from kvroute.index.prefix_index import PrefixIndex

__all__ = ["SourceSpec", "SourceStatus", "SubscriberManager"]

log = logging.getLogger("kvroute.events.subscriber")

# Messages handled per wake-up before going back to the poller, so one busy source cannot
# starve the other sources or the gateway sharing the loop.
_MAX_DRAIN: Final = 128
# Live messages the SUB socket may queue while we replay (ZMQ drops beyond it: a later gap).
_SUB_RCVHWM: Final = 100_000
_MONITOR_EVENTS: Final = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


@dataclass(frozen=True)
class SourceSpec:
    """Where one engine source (engine, DP rank) publishes: PUB endpoint, optional replay ROUTER."""

    source: SourceId
    engine: str
    model: str
    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""


@dataclass(frozen=True)
class SourceStatus:
    """A snapshot of one source's subscription, for /debug and tests."""

    source: SourceId
    engine: str
    rank: int
    endpoint: str
    connected: bool
    last_seq: int | None
    stale: bool
    stale_reason: str | None
    last_batch_age_s: float | None
    blocks: int


class _Shared:
    """What every source task of one manager uses: index, metrics, context, replay limits."""

    def __init__(
        self,
        index: PrefixIndex,
        metrics: Metrics,
        context: zmq.asyncio.Context,
        replay_timeout_s: float,
        max_concurrent_replays: int,
        retry_backoff_s: tuple[float, float],
    ) -> None:
        self.index = index
        self.metrics = metrics
        self.context = context
        self.replay_timeout_s = replay_timeout_s
        self.replay_slots = asyncio.Semaphore(max_concurrent_replays)
        self.retry_backoff_s = retry_backoff_s


class _Source:
    """The state machine of one source; `run()` is its task.

    `last` is the last applied seq (None: no base yet, the next bootstrap or live batch sets
    it). Stale comes in two kinds: a *gap* we could not close (live batches are held back,
    counted `stale_source`, and the replay is retried from `last + 1` with backoff), and a
    *malformed* batch (its seq is consumed and live batches keep flowing; only a reset or an
    AllBlocksCleared makes the source consistent again, since a replay repeats the bad bytes).
    """

    def __init__(self, spec: SourceSpec, shared: _Shared) -> None:
        self.spec = spec
        self.shared = shared
        self.src: str = spec.source
        try:
            self.rank = split_source_id(spec.source)[1]
        except ValueError:
            self.rank = 0
        self.decoder = BatchDecoder()
        self.counters = shared.metrics.event_counters
        m = shared.metrics
        self._m_last_seq = m.source_last_seq.labels(self.src)
        self._m_stale = m.source_stale.labels(self.src)
        self._m_stale_s = m.source_stale_seconds.labels(self.src)
        self._m_gaps = m.seq_gaps.labels(self.src)
        self._m_stale.set(0)
        self.last: int | None = None
        self.last_live: int | None = None  # the previous live seq (the live stream only rises)
        # seq -> hash(payload) of replayed batches until the live stream passes them: a live
        # seq <= last is replay overlap only if its bytes are the ones we applied; anything
        # else means a new engine process reuses the seqs (restart).
        self.replayed: dict[int, int] = {}
        self.need_bootstrap = True
        self.connected = False
        self.last_batch_t: float | None = None
        self.gap_stale: str | None = None  # why a gap could not be closed
        self.malformed_stale = False
        self.stale_since: float | None = None
        self.retry_at: float | None = None
        self.backoff = shared.retry_backoff_s[0]
        self.resync_on_retry = False  # the retry resets and bootstraps instead of replaying
        self.live_bootstrap = False  # a live batch already triggered a bootstrap since reset
        self.sockets: tuple[zmq.asyncio.Socket, zmq.asyncio.Socket] | None = None

    # -- state helpers --

    @property
    def stale(self) -> bool:
        return self.gap_stale is not None or self.malformed_stale

    def stale_reason(self) -> str | None:
        if self.malformed_stale:
            return "malformed"
        return self.gap_stale

    def _update_stale(self) -> None:
        now_stale = self.stale
        if now_stale and self.stale_since is None:
            self.stale_since = time.monotonic()
            self.shared.index.set_stale(self.spec.source, True)
            self._m_stale.set(1)
        elif not now_stale and self.stale_since is not None:
            self._m_stale_s.inc(time.monotonic() - self.stale_since)
            self.stale_since = None
            self.shared.index.set_stale(self.spec.source, False)
            self._m_stale.set(0)

    def _clear_stale(self) -> None:
        self.gap_stale = None
        self.malformed_stale = False
        self.retry_at = None
        self.resync_on_retry = False
        self.backoff = self.shared.retry_backoff_s[0]
        self._update_stale()

    def _mark_gap_stale(self, reason: str, *, resync: bool) -> None:
        self.gap_stale = reason
        self.resync_on_retry = resync
        self.retry_at = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, self.shared.retry_backoff_s[1])
        self._update_stale()

    def reset(self, cause: ResetCause) -> None:
        """Drop everything this source held; the next replay or live batch is a new base."""
        self.shared.index.reset_source(self.spec.source)
        self.shared.metrics.source_resets.labels(self.src, cause.value).inc()
        self.last = None
        self.last_live = None
        self.replayed.clear()
        self.need_bootstrap = True
        self.live_bootstrap = False
        self.decoder = BatchDecoder()
        self._clear_stale()

    # -- applying batches --

    def apply(self, seq: int, payload: bytes) -> None:
        """Decode and apply the batch that follows `last` (or is the new base)."""
        self.counters.batches[self.src] += 1
        self.last = seq
        self.last_batch_t = time.monotonic()
        self._m_last_seq.set(seq)
        batch = self._decode(payload)
        if batch is None:
            # The seq is consumed; a replay would repeat the same bytes, so only a reset or an
            # AllBlocksCleared can make this source consistent again.
            self.malformed_stale = True
            self._update_stale()
            return
        rank = batch.data_parallel_rank
        if rank is not None and rank != self.rank:
            self.shared.metrics.rank_mismatches.labels(self.src).inc()
        self.shared.index.apply(self.spec.source, batch)
        if AllBlocksCleared in map(type, batch.events):
            self._cleared()

    def _decode(self, payload: bytes) -> EventBatch | None:
        """The batch, None if it cannot be decoded; both malformed batches and event kinds the
        decoder skipped are counted (pinned by test_gateway_metric_labels.py)."""
        try:
            batch = self.decoder.decode(payload)
        except WireError:
            self.counters.drop(self.src, DropReason.MALFORMED)
            return None
        if batch.skipped_events:
            self.counters.drop(self.src, DropReason.UNKNOWN_TAG, batch.skipped_events)
        return batch

    def _cleared(self) -> None:
        """The engine dropped its whole cache: counted as a reset; it ends malformed staleness."""
        self.shared.metrics.source_resets.labels(
            self.src, ResetCause.ALL_BLOCKS_CLEARED.value
        ).inc()
        if self.malformed_stale:
            self.malformed_stale = False
            self._update_stale()

    def hold(self, seq: int, payload: bytes) -> None:
        """A live batch while gap-stale: dropped, unless it clears everything (a fresh base)."""
        self.counters.batches[self.src] += 1
        batch = self._decode(payload)
        if batch is None:
            return
        cleared_at = _last_clear(batch)
        if cleared_at is None:
            self.counters.drop(self.src, DropReason.STALE_SOURCE, max(1, len(batch.events)))
            return
        # Everything before the AllBlocksCleared is moot; what follows starts from empty.
        if cleared_at:
            self.counters.drop(self.src, DropReason.STALE_SOURCE, cleared_at)
        tail = EventBatch(
            ts=batch.ts,
            events=batch.events[cleared_at:],
            data_parallel_rank=batch.data_parallel_rank,
            skipped_events=batch.skipped_events,
        )
        self.shared.index.apply(self.spec.source, tail)
        self.last = seq
        self.last_batch_t = time.monotonic()
        self._m_last_seq.set(seq)
        self._clear_stale()
        self._cleared()

    # -- replay --

    async def replay_from(self, start: int, *, bootstrap: bool) -> ReplayOutcome:
        """Fetch batches >= start and apply those that continue `last` (dedupe by seq).

        OK: the end marker arrived and nothing was missing. PARTIAL: the buffer no longer
        reached `start` (harmless in a bootstrap: a late joiner holds a subset of the truth).
        """
        endpoint = self.spec.replay_endpoint
        if endpoint is None:
            return self._count_replay(ReplayOutcome.NO_ENDPOINT)
        try:
            async with self.shared.replay_slots:
                result = await request_replay(
                    self.shared.context, endpoint, start, timeout_s=self.shared.replay_timeout_s
                )
        except KvrouteError:
            return self._count_replay(ReplayOutcome.ERROR)
        outcome = ReplayOutcome.OK if result.complete else ReplayOutcome.TIMEOUT
        for seq, payload in result.batches:
            last = self.last
            if last is not None and seq <= last:
                self.counters.batches[self.src] += 1
                self.counters.drop(self.src, DropReason.DUPLICATE)
                continue
            expected = start if last is None else last + 1
            if seq != expected and not (bootstrap and last is None):
                outcome = ReplayOutcome.PARTIAL
                break
            self.apply(seq, payload)
            self.replayed[seq] = hash(payload)
        return self._count_replay(outcome)

    def _count_replay(self, outcome: ReplayOutcome) -> ReplayOutcome:
        self.shared.metrics.replays.labels(self.src, outcome.value).inc()
        return outcome

    async def bootstrap(self) -> None:
        """First contact (or after a reset): replay from 0 when the engine keeps a buffer."""
        self.need_bootstrap = False
        if self.spec.replay_endpoint is not None:
            await self.replay_from(0, bootstrap=True)

    async def retry(self) -> None:
        """The backoff timer of a gap-stale source fired."""
        self.retry_at = None
        if self.resync_on_retry:
            # The buffer moved past last + 1 (or there is none): start over as a late joiner,
            # which holds a safe subset of the engine's cache.
            self.reset(ResetCause.RESYNC)
            await self.bootstrap()
            return
        assert self.last is not None
        outcome = await self.replay_from(self.last + 1, bootstrap=False)
        if outcome is ReplayOutcome.OK:
            self._clear_stale()
        else:
            self._mark_gap_stale(f"replay_{outcome.value}", resync=outcome is ReplayOutcome.PARTIAL)

    # -- the live stream --

    async def on_live(self, seq: int, payload: bytes, *, may_restart: bool = True) -> None:
        """Every live batch that is not simply `last + 1` on a healthy source.

        `may_restart` is False right after a restart was detected for this very batch, so an
        engine whose replay disagrees with its live stream cannot make us loop.
        """
        if self.last is None and (
            self.need_bootstrap
            or (seq > 0 and self.spec.replay_endpoint is not None and not self.live_bootstrap)
        ):
            # Batches before this one may have been published after the first bootstrap's
            # snapshot but before our subscription reached the PUB (slow joiner): ask once more.
            self.live_bootstrap = True
            await self.bootstrap()
        last = self.last
        if last is None:
            self.apply(seq, payload)  # the first batch we see is the base (late join)
            self.last_live = seq
            return
        if self.last_live is not None and seq <= self.last_live:
            await self._restarted(seq, payload)
            return
        self.last_live = seq
        if seq <= last:
            await self._overlap(seq, payload, may_restart=may_restart)
            return
        if self.gap_stale is not None:
            self.hold(seq, payload)
            return
        if seq == last + 1:
            self.replayed.clear()
            self.apply(seq, payload)
            return
        self._m_gaps.inc()
        outcome = await self.replay_from(last + 1, bootstrap=False)
        last = self.last
        assert last is not None
        if seq <= last:
            await self._overlap(seq, payload, may_restart=may_restart)  # replay included it
        elif seq == last + 1:
            self.apply(seq, payload)
        else:
            if outcome is ReplayOutcome.OK:
                outcome = ReplayOutcome.PARTIAL  # the end marker came before the live seq
            self._mark_gap_stale(
                f"replay_{outcome.value}",
                resync=outcome in (ReplayOutcome.PARTIAL, ReplayOutcome.NO_ENDPOINT),
            )
            self.hold(seq, payload)

    async def _overlap(self, seq: int, payload: bytes, *, may_restart: bool) -> None:
        """A live seq we already hold: replay overlap if the bytes match, else a restart."""
        if not may_restart or self.replayed.get(seq) == hash(payload):
            self.counters.batches[self.src] += 1
            self.counters.drop(self.src, DropReason.DUPLICATE)
            return
        await self._restarted(seq, payload)

    async def _restarted(self, seq: int, payload: bytes) -> None:
        self.reset(ResetCause.SEQ_BACKWARDS)
        await self.on_live(seq, payload, may_restart=False)

    def on_disconnect(self, sub: zmq.Socket[Any]) -> None:
        self.connected = False
        self.reset(ResetCause.DISCONNECT)
        # Whatever is still queued came from the engine we just lost.
        with contextlib.suppress(zmq.ZMQError):
            while True:
                sub.recv_multipart(zmq.NOBLOCK)

    # -- the task --

    def open(self) -> None:
        """Create and connect the SUB socket and its monitor; a bad endpoint raises ConfigError."""
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
            raise ConfigError(f"source {self.src}: cannot open a SUB socket ({exc})") from exc
        try:
            sub.connect(self.spec.endpoint)
        except zmq.ZMQError as exc:
            self._close(sub, monitor)
            raise ConfigError(
                f"source {self.src}: endpoint: expected a ZeroMQ connect address like "
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
        """The source's task: wait for readability, drain, handle monitor events and retries."""
        assert self.sockets is not None, "open() first"
        sub, monitor = self.sockets
        try:
            raw: zmq.Socket[Any] = zmq.Socket.shadow(sub.underlying)
            poller = zmq.asyncio.Poller()
            poller.register(sub, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            while True:
                timeout_ms: int | None = None
                if self.retry_at is not None:
                    timeout_ms = max(0, int((self.retry_at - time.monotonic()) * 1000) + 1)
                ready = dict(await poller.poll(timeout_ms))
                try:
                    if monitor in ready:
                        await self._drain_monitor(monitor, raw)
                    if sub in ready:
                        await self._drain(raw)
                    if self.retry_at is not None and time.monotonic() >= self.retry_at:
                        await self.retry()
                except Exception:
                    # A bug or an input we did not foresee must not end this source's task
                    # silently or leave half-known state: log it and start over.
                    log.exception("subscriber %s: unexpected error; resetting the source", self.src)
                    self.reset(ResetCause.RESYNC)
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
                self.on_disconnect(raw)
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
                if self.need_bootstrap:
                    await self.bootstrap()

    async def _drain(self, raw: zmq.Socket[Any]) -> None:
        for _ in range(_MAX_DRAIN):
            try:
                frames = raw.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or len(frames[1]) != 8:
                self.counters.drop(self.src, DropReason.MALFORMED)
                continue
            seq = int.from_bytes(frames[1], "big")
            last = self.last
            if last is not None and seq == last + 1 and self.gap_stale is None:
                self.last_live = seq
                if self.replayed:
                    self.replayed.clear()
                self.apply(seq, frames[2])
            else:
                await self.on_live(seq, frames[2])

    def status(self) -> SourceStatus:
        age = None if self.last_batch_t is None else time.monotonic() - self.last_batch_t
        return SourceStatus(
            source=self.spec.source,
            engine=self.spec.engine,
            rank=self.rank,
            endpoint=self.spec.endpoint,
            connected=self.connected,
            last_seq=self.last,
            stale=self.stale,
            stale_reason=self.stale_reason(),
            last_batch_age_s=age,
            blocks=self.shared.index.source_block_count(self.spec.source),
        )


def _last_clear(batch: EventBatch) -> int | None:
    found = None
    for i, event in enumerate(batch.events):
        if type(event) is AllBlocksCleared:
            found = i
    return found


class SubscriberManager:
    """Runs one subscriber task per source; sources come and go at runtime.

    Recovery policy (ARCHITECTURE.md, "Resets are explicit"): seq backwards or a SUB
    disconnect resets the source and bootstraps by replay from 0. A gap that replay cannot
    close makes the source stale; it is retried with exponential backoff (`retry_backoff_s`),
    and when the replay buffer no longer reaches the gap (or there is no replay endpoint) the
    retry resets the source and bootstraps again (cause `resync`), like a late joiner.
    """

    def __init__(
        self,
        index: PrefixIndex,
        metrics: Metrics,
        *,
        context: zmq.asyncio.Context | None = None,
        replay_timeout_s: float = 2.0,
        max_concurrent_replays: int = 4,
        retry_backoff_s: tuple[float, float] = (0.5, 10.0),
    ) -> None:
        if max_concurrent_replays < 1:
            raise ValueError(f"max_concurrent_replays: expected >= 1, got {max_concurrent_replays}")
        self._own_context = context is None
        self._context = context if context is not None else zmq.asyncio.Context()
        self._shared = _Shared(
            index,
            metrics,
            self._context,
            replay_timeout_s,
            max_concurrent_replays,
            retry_backoff_s,
        )
        self._sources: dict[SourceId, _Source] = {}
        self._tasks: dict[SourceId, asyncio.Task[None]] = {}
        self._closed = False

    async def add_source(self, spec: SourceSpec) -> None:
        """Start subscribing to `spec` (replacing an existing source with the same id).

        Returns at once: the source runs as its own task. A malformed endpoint raises
        `ConfigError`; an unreachable one just stays disconnected until it comes up.
        """
        if self._closed:
            raise RuntimeError("SubscriberManager is closed")
        if spec.source in self._sources:
            await self.remove_source(spec.source)
        state = _Source(spec, self._shared)
        state.open()
        self._shared.index.add_source(spec.source, engine=spec.engine, model=spec.model)
        self._sources[spec.source] = state
        self._tasks[spec.source] = asyncio.create_task(
            state.run(), name=f"kvroute-subscriber-{spec.source}"
        )

    async def remove_source(self, source: SourceId) -> None:
        """Stop the source's task and drop what it held from the index."""
        state = self._sources.pop(source, None)
        task = self._tasks.pop(source, None)
        if task is not None:
            await _cancel(task)
        if state is None:
            return
        if state.stale_since is not None:
            state._m_stale_s.inc(time.monotonic() - state.stale_since)
        self._shared.index.remove_source(source)
        metrics = self._shared.metrics
        metrics.source_resets.labels(state.src, ResetCause.REMOVED.value).inc()
        metrics.source_stale.labels(state.src).set(0)

    def status(self) -> list[SourceStatus]:
        return [state.status() for state in self._sources.values()]

    def sources(self) -> list[SourceSpec]:
        return [state.spec for state in self._sources.values()]

    async def wait_for_seq(self, source: SourceId, seq: int, timeout_s: float = 10.0) -> bool:
        """Test helper: poll until the source's last applied seq is >= `seq` (False on timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            state = self._sources.get(source)
            if state is not None and state.last is not None and state.last >= seq:
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.005)

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
