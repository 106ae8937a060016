"""The recovery state machine of one engine source: seq tracking, replay, resets, staleness.
Synchronous and socket-free; the only code that writes a source's state into the index."""

from __future__ import annotations

import enum
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvroute.core import (
    AllBlocksCleared,
    DropReason,
    Event,
    EventBatch,
    EventCounters,
    IngestLimits,
    ReplayOutcome,
    ResetCause,
    SourceSpec,
    SourceStatus,
)
from kvroute.errors import WireError
from kvroute.events.budget import IngestBudget
from kvroute.events.wire import BatchDecoder
from kvroute.index import PrefixIndex

log = logging.getLogger("kvroute.events.tracker")

_take_run: Callable[..., tuple[int, int, EventBatch | None, list[Event] | None, bytes | None]]
_take_run = None  # type: ignore[assignment]
try:  # on_live_run's loop in C (events/_recv.c), else `SourceTracker._take_run`
    from kvroute.events import _recv  # type: ignore[attr-defined]

    _take_run = _recv.take_run
except ImportError:  # pragma: no cover - the extension is built by `make`
    pass

_WARN_EVERY_S = 60.0  # one line per source and kind of refusal per minute; counters count all

__all__ = ["RecoveryTimings", "ReplayKind", "ReplayRequest", "SourceTracker", "payload_digest"]


def payload_digest(payload: bytes) -> bytes:
    """A digest of a batch's bytes that is the same in every process (unlike `hash`): what a
    snapshot keeps of a source's last batch, to recognise the same engine process later."""
    return hashlib.blake2b(payload, digest_size=16).digest()


class ReplayKind(enum.Enum):
    """Why a replay is asked for; it decides what its outcome means."""

    BOOTSTRAP = "bootstrap"  # first contact or after a reset: from seq 0
    GAP = "gap"  # the live stream skipped seqs: from last + 1, then the live batch that showed it
    RETRY = "retry"  # a stale source's backoff timer fired: from last + 1
    TAIL = "tail"  # a quiet source: was its last batch lost? from last + 1
    CONFIRM = "confirm"  # blocks restored from a snapshot: from `last`, whose bytes must match


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """Ask the source's replay ROUTER for every batch with seq >= `start`."""

    start: int
    kind: ReplayKind


@dataclass(frozen=True, slots=True)
class RecoveryTimings:
    """The tracker's timers: retry backoff of a stale source (doubling from `backoff_min_s` to
    `backoff_max_s`) and how long a source may be quiet before its tail is checked (0: never)."""

    backoff_min_s: float
    backoff_max_s: float
    tail_check_s: float


class SourceTracker:
    """The rules of docs/design.md §5 for one source (engine, DP rank), one input at a time.

    Inputs: `on_connect`, `on_disconnect`, `on_live` (a live batch), `on_replay` /
    `on_replay_failed` (the answer to a `ReplayRequest` the tracker returned), `tick` (timers, on
    the injected clock). Each returns the next replay to run, or None; the caller runs it and
    feeds its result back before any other input. `last` is the last applied seq (None: no base
    yet). The tracker alone calls `index.apply`, `reset_source` and `set_stale` for its source:
    staleness has one owner. Stale comes in two kinds: a *gap* we could not close (live
    batches are held back, counted `stale_source`, and the replay is retried with backoff),
    and a *malformed* batch (its seq is consumed and live batches keep flowing; only a reset or
    an AllBlocksCleared makes the source consistent again, since a replay repeats the bad bytes).
    """

    def __init__(
        self,
        spec: SourceSpec,
        index: PrefixIndex,
        counters: EventCounters,
        timings: RecoveryTimings,
        clock: Callable[[], float],
        budget: IngestBudget | None = None,
    ) -> None:
        self.spec = spec
        self.source = spec.source
        self._src: str = spec.source
        self._index = index
        self._counters = counters
        self._batches = counters.batches  # the one counter of every batch, without a lookup
        self._rank = spec.rank
        self._timings = timings
        self._clock = clock
        self._has_replay = spec.replay_endpoint is not None
        self._decoder = BatchDecoder(raw_tokens=index.raw_tokens)
        self._budget = budget if budget is not None else IngestBudget(IngestLimits(), clock)
        self._limited = self._budget.limited  # read once per batch: a plain attribute
        # Went over its budget on the live stream: its replays are charged too until one has
        # caught it up. An honest source's bootstrap and gap repairs are not (they are bounded
        # by the replay limits instead), so a restart does not leave it stale for a minute.
        self._throttled = False
        self._warned: dict[str, float] = {}  # refusal kind -> when last logged (clock time)
        limits = self._budget.limits
        self._max_events = limits.max_batch_events
        self._max_blocks = limits.max_batch_blocks
        # Every event and every block hash takes at least a byte: a smaller payload cannot
        # pass either limit, so the common batch is not looked at (-1: no limit at all).
        sizes = [n for n in (self._max_events, self._max_blocks) if n > 0]
        self._size_floor = min(sizes) if sizes else -1
        self.last: int | None = None
        # The previous live seq of the engine process we are following (None: not known). A live
        # stream only rises; it survives a resync (same process), not a restart or disconnect.
        self._last_live: int | None = None
        # seq -> hash(payload) of replayed batches until the live stream passes them: a live seq
        # <= last is replay overlap if its bytes are the ones we applied; other bytes mean a new
        # engine process reuses the seqs (restart).
        self._replayed: dict[int, int] = {}
        self._need_bootstrap = True
        # The first bootstrap has ended (answered, failed, or there is no replay endpoint): what
        # the engine's buffer held is in the index. Latched: later resets do not unsettle it.
        self.settled = False
        self._live_bootstrap = False  # a live batch already asked for a bootstrap since the reset
        self._pending: tuple[int, bytes, bool] | None = None  # live batch waiting for a replay
        self.connected = False
        self._last_batch_t: float | None = None
        self._quiet_since = clock()  # connect or tail check (applied batches: _last_batch_t)
        # When the SUB socket last received a message (of any kind), or connected: a source
        # that stays quiet while its engine serves requests is misconfigured (gateway/silence.py).
        self._heard_at = self._quiet_since
        self._gap_stale: str | None = None  # why a gap could not be closed
        self._malformed_stale = False
        self._stale_since: float | None = None
        self._stale_total_s = 0.0
        self._retry_at: float | None = None
        self._backoff = timings.backoff_min_s
        self._resync_on_retry = False  # the retry resets and bootstraps instead of replaying
        # Blocks restored from a snapshot, stale until the engine's replay shows it is the same
        # process (seq `last` with the bytes we applied) and what followed.
        self.unconfirmed = False
        self._restored_digest = b""
        self._last_payload: bytes | None = None  # of `last`: a reference, hashed at snapshot

    # --- state ------------------------------------------------------------------------------

    @property
    def stale(self) -> bool:
        return self._gap_stale is not None or self._malformed_stale

    def stale_reason(self) -> str | None:
        if self._malformed_stale:
            return "malformed"
        return self._gap_stale

    def status(self) -> SourceStatus:
        now = self._clock()
        stale_s = self._stale_total_s
        if self._stale_since is not None:
            stale_s += now - self._stale_since
        return SourceStatus(
            source=self.source,
            engine=self.spec.engine,
            rank=self.spec.rank,
            endpoint=self.spec.endpoint,
            connected=self.connected,
            last_seq=self.last,
            stale=self.stale,
            stale_reason=self.stale_reason(),
            last_batch_age_s=None if self._last_batch_t is None else now - self._last_batch_t,
            blocks=self._index.source_block_count(self.source),
            stale_seconds=stale_s,
            quiet_s=now - self._heard_at,
        )

    def heard(self) -> None:
        """The SUB socket received something (called once per drain, not per message)."""
        self._heard_at = self._clock()

    def idle(self) -> bool:
        """The socket is drained: let the index do deferred upkeep (a bounded slice; table
        growth, cleared sources). True while it has more: the caller yields and calls again."""
        return self._index.maintain(self.source)

    def next_deadline(self) -> float | None:
        """When `tick` has work next (clock time), or None."""
        retry_at, tail = self._retry_at, self._tail_due()
        if retry_at is None:
            return tail
        return retry_at if tail is None or retry_at < tail else tail

    def _update_stale(self) -> None:
        now_stale = self.stale
        if now_stale and self._stale_since is None:
            self._stale_since = self._clock()
            self._index.set_stale(self.source, True)
        elif not now_stale and self._stale_since is not None:
            self._stale_total_s += self._clock() - self._stale_since
            self._stale_since = None
            self._index.set_stale(self.source, False)

    def _clear_stale(self) -> None:
        self._gap_stale = None
        self._malformed_stale = False
        self._retry_at = None
        self._resync_on_retry = False
        self._backoff = self._timings.backoff_min_s
        self._update_stale()

    def _mark_gap_stale(self, reason: str, *, resync: bool, not_before: float = 0.0) -> None:
        self._gap_stale = reason
        self._resync_on_retry = resync
        self._retry_at = max(self._clock() + self._backoff, not_before)
        self._backoff = min(self._backoff * 2, self._timings.backoff_max_s)
        self._update_stale()

    def reset(self, cause: ResetCause) -> None:
        """Drop everything this source held; the next replay or live batch is a new base.

        A resync keeps following the same engine process (the live stream's last seq): its
        queued live batches older than the new bootstrap are backlog, not a restart.
        """
        self._index.reset_source(self.source)
        self._counters.reset(self._src, cause)
        self.last = None
        self.unconfirmed = False
        if cause is not ResetCause.RESYNC:
            self._last_live = None
        self._replayed.clear()
        self._need_bootstrap = True
        self._live_bootstrap = False
        self._pending = None
        self._decoder = BatchDecoder(raw_tokens=self._index.raw_tokens)
        self._clear_stale()

    # --- connection -------------------------------------------------------------------------

    def recovery_state(self) -> tuple[int, bytes] | None:
        """What a snapshot keeps to confirm this source later: the last applied seq and a digest
        of its payload; None without a base or while not consistent (nothing to restore)."""
        if self.last is None or self._last_payload is None or self.stale or not self._has_replay:
            return None
        return self.last, payload_digest(self._last_payload)

    def restore(self, last: int, digest: bytes) -> None:
        """The index holds this source's blocks as a snapshot saw them after seq `last`, whose
        payload had `digest` (`index.restore_source`, `recovery_state`). They stay stale,
        counting for nothing, until the engine's replay from `last` proves it is the same
        process (seq `last` with those bytes: a restarted engine reuses seqs, never the bytes,
        which carry its clock) and brings what followed. Anything else drops them and starts
        over (an `unconfirmed` reset): a restored index may be smaller than the truth, never
        larger (docs/design.md §14). Only a source with a replay endpoint can be restored."""
        if not self._has_replay:
            raise ValueError(f"restore {self.source}: no replay endpoint to confirm it")
        self.last = last
        self._last_live = None
        self._need_bootstrap = False
        self.unconfirmed = True
        self._restored_digest = digest
        self._gap_stale = "unconfirmed"
        self._update_stale()

    def on_connect(self) -> ReplayRequest | None:
        """The SUB socket connected (ZMQ handshake): bootstrap if this is a new base, or ask a
        restored source's engine to confirm it."""
        self.connected = True
        self._heard_at = self._quiet_since = self._clock()
        if self.unconfirmed and self.last is not None:
            return ReplayRequest(self.last, ReplayKind.CONFIRM)
        if self._need_bootstrap:
            return self._bootstrap()
        return None

    def _confirmed(self) -> None:
        self.unconfirmed = False
        self.settled = True
        self._clear_stale()

    def _unconfirm(self) -> ReplayRequest:
        """The engine did not continue the restored `last`: drop the restored blocks and start
        over, keeping the live batch that waits (if any) for after the bootstrap. Only sources
        with a replay endpoint are restored, so there is always one to ask."""
        pending = self._pending
        self.unconfirmed = False
        self.reset(ResetCause.UNCONFIRMED)
        self._pending = pending
        request = self._bootstrap()
        assert request is not None  # restore() refuses sources without a replay endpoint
        return request

    def on_disconnect(self) -> None:
        """The SUB socket lost its connection: the engine may have restarted. The caller drops
        whatever the socket still queued (it came from the engine we just lost)."""
        self.connected = False
        self.reset(ResetCause.DISCONNECT)

    def on_bad_frames(self) -> None:
        """A live message that is not `[topic, seq8, payload]`: counted, nothing else known."""
        self._counters.drop(self._src, DropReason.MALFORMED)

    # --- applying batches -------------------------------------------------------------------

    def _apply(self, seq: int, payload: bytes, charge: bool = True) -> None:
        """Decode and apply the batch that follows `last` (or is the new base); `charge`: its
        events count against the source's budget (a free replay's do not).

        The path of every live message: the counters are plain ints (no per-batch Prometheus
        call; metrics.py reads them at scrape time).
        """
        self._batches[self._src] += 1
        self.last = seq
        self._last_payload = payload
        self._last_batch_t = self._clock()
        batch = self._decode(payload)
        if batch is None:
            # The seq is consumed; a replay would repeat the same bytes, so only a reset or an
            # AllBlocksCleared can make this source consistent again.
            self._malformed_stale = True
            self._update_stale()
            return
        rank = batch.data_parallel_rank
        if rank is not None and rank != self._rank:
            self._counters.rank_mismatches[self._src] += 1
        if charge and self._limited:
            self._budget.charge_events(len(batch.events))
        self._index.apply(self.source, batch)
        if AllBlocksCleared in map(type, batch.events):
            self._cleared()

    def _decode(self, payload: bytes) -> EventBatch | None:
        """The batch, None if it cannot be decoded or carries more events or blocks than a
        source may send in one (`too_large`); malformed and refused batches, event kinds the
        decoder skipped and stores it could not reproduce are counted (pinned by
        tests/e2e/gateway/test_metric_labels.py)."""
        try:
            batch = self._decoder.decode(payload)
        except WireError:
            self._counters.drop(self._src, DropReason.MALFORMED)
            return None
        if self._size_floor >= 0 and len(payload) > self._size_floor and self._too_large(batch):
            self._counters.drop(self._src, DropReason.TOO_LARGE, max(1, len(batch.events)))
            self._warn(
                DropReason.TOO_LARGE,
                "source %s sent a batch over max_batch_events or max_batch_blocks: refused "
                "whole, the source is stale until it clears or resyncs",
            )
            return None
        if batch.skipped_events or batch.unsupported_events:
            self._count_skipped(batch)
        return batch

    def _warn(self, kind: str, message: str) -> None:
        """`message` (with the source for its %s) at warning level, at most once a minute per
        kind of refusal: a flood is counted in full, not logged in full."""
        now = self._clock()
        last = self._warned.get(kind)
        if last is None or now - last >= _WARN_EVERY_S:
            self._warned[kind] = now
            log.warning(message, self._src)

    def _too_large(self, batch: EventBatch) -> bool:
        events = batch.events
        if 0 < self._max_events < len(events):
            return True
        if self._max_blocks <= 0:
            return False
        blocks = 0
        for event in events:
            if not isinstance(event, AllBlocksCleared):
                blocks += len(event.block_hashes)
        return blocks > self._max_blocks

    def _count_skipped(self, batch: EventBatch) -> None:
        if batch.skipped_events:
            self._counters.drop(self._src, DropReason.UNKNOWN_TAG, batch.skipped_events)
        if batch.unsupported_events:
            self._counters.drop(
                self._src, DropReason.UNSUPPORTED_EXTRA_KEYS, batch.unsupported_events
            )

    def _cleared(self) -> None:
        """The engine dropped its whole cache: counted as a reset; it ends malformed staleness
        (everything after it in order is known), never gap staleness (batches may be missing)."""
        self._counters.reset(self._src, ResetCause.ALL_BLOCKS_CLEARED)
        if self._malformed_stale:
            self._malformed_stale = False
            self._update_stale()

    def _hold(self, seq: int, payload: bytes) -> None:
        """A live batch while gap-stale: dropped, unless it clears everything (a fresh base)."""
        self._counters.batches[self._src] += 1
        batch = self._decode(payload)
        if batch is None:
            return
        if self._limited:
            self._budget.charge_events(len(batch.events))
        cleared_at = _last_clear(batch)
        if cleared_at is None:
            self._counters.drop(self._src, DropReason.STALE_SOURCE, max(1, len(batch.events)))
            return
        # Everything before the AllBlocksCleared is moot; what follows starts from empty.
        if cleared_at:
            self._counters.drop(self._src, DropReason.STALE_SOURCE, cleared_at)
        tail = EventBatch(
            batch.ts, batch.events[cleared_at:], batch.data_parallel_rank, 0, 0
        )  # its drops were counted above
        self._index.apply(self.source, tail)
        self.last = seq
        self._last_payload = payload
        self._last_batch_t = self._clock()
        self._clear_stale()
        self._cleared()

    # --- the live stream --------------------------------------------------------------------

    def on_live(self, seq: int, payload: bytes) -> ReplayRequest | None:
        """One live batch; the common case (`last + 1` on a consistent source) is applied here."""
        if self._limited and not self._budget.admit(len(payload)):
            self._over_budget()
            return None
        last = self.last
        if last is not None and seq == last + 1 and self._gap_stale is None:
            self._last_live = seq
            if self._replayed:
                self._replayed.clear()
            self._apply(seq, payload)
            return None
        return self._live(seq, payload, may_restart=True)

    def on_live_run(self, items: Sequence[tuple[int, bytes] | None], at: int) -> int:
        """`on_live` for `items[at:]` (a native receive slice) while each is the common case:
        the next seq of a consistent source, under the size floor, decodable, no
        AllBlocksCleared, no skipped or unsupported events, this source's rank, admitted by the
        budget (`_take_run`; `_recv.take_run` is the same loop in C). Their events go to the
        index as ONE batch (per-call costs paid once per slice: design §12). Returns the index
        of the first item left to `on_live`, `at` when none was taken; such an item is decoded
        again there, which only an uncommon batch pays."""
        last = self.last
        if last is None or self._gap_stale is not None:
            return at
        decode = self._decoder.decode
        budget = self._budget if self._limited else None
        if _take_run is not None:
            i, last, first, merged, payload = _take_run(
                items, at, last, decode, self._size_floor, budget, self._rank,
                AllBlocksCleared, WireError, self._decoder.plain_parts(),
            )  # fmt: skip
            events: list[Event] = merged or []
        else:
            i, last, first, events, payload = self._take_run(items, at, last, decode, budget)
        if first is None:
            return at
        self._batches[self._src] += i - at
        self.last = last
        self._last_live = last
        if self._replayed:
            self._replayed.clear()
        self._last_payload = payload
        self._last_batch_t = self._clock()
        self._index.apply(self.source, first if not events else EventBatch(first.ts, events))
        return i

    def _take_run(
        self,
        items: Sequence[tuple[int, bytes] | None],
        at: int,
        last: int,
        decode: Callable[[bytes], EventBatch],
        budget: IngestBudget | None,
    ) -> tuple[int, int, EventBatch | None, list[Event], bytes]:
        """`on_live_run`'s loop in Python: the reference of `_recv.take_run` (and the loop where
        the extension is not built); same result, stops at the same item."""
        floor = self._size_floor
        end = len(items)
        i = at
        events: list[Event] = []
        first: EventBatch | None = None
        payload = b""
        while i < end:
            item = items[i]
            if item is None or item[0] != last + 1:
                break
            if 0 <= floor < len(item[1]):
                break
            try:
                batch = decode(item[1])
            except WireError:
                break
            rank = batch.data_parallel_rank
            if (
                AllBlocksCleared in map(type, batch.events)
                or batch.skipped_events
                or batch.unsupported_events
                or (rank is not None and rank != self._rank)
            ):
                break  # on_live counts and applies it
            # Admitted last: an item left to on_live has been charged nothing.
            if budget is not None:
                if not budget.admit(len(item[1])):
                    break
                budget.charge_events(len(batch.events))
            if first is None:
                first = batch
            else:
                if not events:
                    events.extend(first.events)
                events.extend(batch.events)
            payload = item[1]
            last += 1
            i += 1
        return i, last, first, events, payload

    def _over_budget(self) -> None:
        """A live batch while the source is over its ingest budget: refused before decoding and
        counted (per batch). The source is gap-stale from its `last`, and a replay from there
        is asked for once the budget allows (events/budget.py): the index is exact or stale,
        never partial. Without a base, or with restored blocks not yet confirmed, the retry
        starts over instead (a smaller index, never a larger one)."""
        self._counters.batches[self._src] += 1
        self._counters.drop(self._src, DropReason.OVER_BUDGET)
        self._warn(
            DropReason.OVER_BUDGET,
            "source %s is over its ingest budget (source_events_per_s, source_bytes_per_s or "
            "the totals): batches refused, stale until a replay catches it up",
        )
        self._throttled = True
        if self._gap_stale is None:
            self._mark_gap_stale(
                "over_budget",
                resync=self.last is None or self.unconfirmed,
                not_before=self._budget.ready_at(),
            )

    def _live(self, seq: int, payload: bytes, *, may_restart: bool) -> ReplayRequest | None:
        """Every live batch that is not simply `last + 1` on a consistent source.

        `may_restart` is False right after a restart was detected for this very batch, so an
        engine whose replay disagrees with its live stream cannot make us loop.
        """
        if self.last is None and (
            self._need_bootstrap or (seq > 0 and self._has_replay and not self._live_bootstrap)
        ):
            # Batches before this one may have been published after the first bootstrap's
            # snapshot but before our subscription reached the PUB (slow joiner): ask once more.
            self._live_bootstrap = True
            request = self._bootstrap()
            if request is not None:
                self._pending = (seq, payload, may_restart)
                return request
        return self._continue_live(seq, payload, may_restart)

    def _continue_live(self, seq: int, payload: bytes, may_restart: bool) -> ReplayRequest | None:
        last = self.last
        if last is None:
            self._apply(seq, payload)  # the first batch we see is the base (late join)
            self._last_live = seq
            return None
        if self.unconfirmed:  # only before on_connect's confirmation: ask for it first
            self._pending = (seq, payload, may_restart)
            return ReplayRequest(last, ReplayKind.CONFIRM)
        previous = self._last_live
        if previous is not None and seq <= previous:
            return self._restarted(seq, payload)
        self._last_live = seq
        if seq <= last:
            return self._overlap(seq, payload, previous, may_restart)
        if self._gap_stale is not None:
            self._hold(seq, payload)
            return None
        if seq == last + 1:
            self._replayed.clear()
            self._apply(seq, payload)
            return None
        self._counters.seq_gaps[self._src] += 1
        self._pending = (seq, payload, may_restart)
        return self._replay(ReplayRequest(last + 1, ReplayKind.GAP))

    def _overlap(
        self, seq: int, payload: bytes, previous: int | None, may_restart: bool
    ) -> ReplayRequest | None:
        """A live seq we already hold. A replay overlap when its bytes match the replayed ones,
        or, for a seq no replay returned, when the live stream rises from a seq we saw: backlog
        the SUB socket queued before a bootstrap overtook it. Otherwise an engine restart."""
        replayed = self._replayed.get(seq)
        same_process = previous is not None if replayed is None else replayed == hash(payload)
        if same_process or not may_restart:
            self._counters.batches[self._src] += 1
            self._counters.drop(self._src, DropReason.DUPLICATE)
            return None
        return self._restarted(seq, payload)

    def _restarted(self, seq: int, payload: bytes) -> ReplayRequest | None:
        self.reset(ResetCause.SEQ_BACKWARDS)
        return self._live(seq, payload, may_restart=False)

    # --- replay -----------------------------------------------------------------------------

    def _bootstrap(self) -> ReplayRequest | None:
        """First contact (or after a reset): replay from 0 when the engine keeps a buffer."""
        self._need_bootstrap = False
        if not self._has_replay:
            self.settled = True
            return None
        return ReplayRequest(0, ReplayKind.BOOTSTRAP)

    def _replay(self, request: ReplayRequest) -> ReplayRequest | None:
        """Hand `request` to the caller, or settle it at once when there is no replay endpoint."""
        if self._has_replay:
            return request
        return self.on_replay_failed(request, ReplayOutcome.NO_ENDPOINT)

    def on_replay(
        self,
        request: ReplayRequest,
        batches: Sequence[tuple[int, bytes]],
        complete: bool,
        truncated: bool = False,
    ) -> ReplayRequest | None:
        """The replayed `(seq, payload)` pairs, oldest first; `complete` when the end marker came,
        `truncated` when the reply passed its limits and was not read further (it then ends
        like a timeout: what came is applied, the rest is asked for again).

        Those that continue `last` are applied (dedupe by seq). PARTIAL: the buffer no longer
        reached `start` (harmless in a bootstrap: a late joiner holds a subset of the truth).
        """
        outcome = (
            ReplayOutcome.OK
            if complete
            else ReplayOutcome.TRUNCATED
            if truncated
            else ReplayOutcome.TIMEOUT
        )
        if request.kind is ReplayKind.CONFIRM and self.unconfirmed:
            first = batches[0] if batches else None
            if (
                first is None
                or first[0] != self.last
                or payload_digest(first[1]) != self._restored_digest
            ):
                # The buffer no longer holds `last`, or another process wrote it.
                if complete:
                    outcome = ReplayOutcome.PARTIAL
                return self._replay_done(request, outcome)
            self._counters.batches[self._src] += 1
            self._counters.drop(self._src, DropReason.DUPLICATE)
            batches = batches[1:]
        applied = 0
        for seq, payload in batches:
            last = self.last
            # Without a base (a bootstrap, or the tail check of a source that has none) the
            # first batch is the base; after it, and from any base, only `last + 1` follows.
            if last is not None:
                if seq <= last:
                    self._counters.batches[self._src] += 1
                    self._counters.drop(self._src, DropReason.DUPLICATE)
                    continue
                if seq != last + 1:
                    outcome = ReplayOutcome.PARTIAL
                    break
            if self._throttled and not self._budget.admit(len(payload)):
                outcome = ReplayOutcome.OVER_BUDGET
                break
            self._apply(seq, payload, charge=self._throttled)
            self._replayed[seq] = hash(payload)
            applied += 1
        if applied and request.kind is ReplayKind.TAIL:
            self._counters.seq_gaps[self._src] += 1  # the lost tail was a gap nothing revealed
        return self._replay_done(request, outcome)

    def on_replay_failed(
        self, request: ReplayRequest, outcome: ReplayOutcome
    ) -> ReplayRequest | None:
        """The replay could not be run (`error`: a socket failure; `no_endpoint`)."""
        return self._replay_done(request, outcome)

    def _replay_done(self, request: ReplayRequest, outcome: ReplayOutcome) -> ReplayRequest | None:
        self._counters.replay(self._src, outcome)
        if outcome is ReplayOutcome.OVER_BUDGET and not (
            request.kind is ReplayKind.CONFIRM and self.unconfirmed
        ):
            return self._replay_over_budget(request)
        kind = request.kind
        if kind is ReplayKind.CONFIRM and self.unconfirmed:
            if outcome is not ReplayOutcome.OK:
                return self._unconfirm()  # the waiting live batch follows its bootstrap
            else:
                self._confirmed()
                kind = ReplayKind.GAP  # the waiting live batch follows the confirmed `last`
        if kind is ReplayKind.BOOTSTRAP:
            self.settled = True
        elif kind is ReplayKind.RETRY:
            if outcome is ReplayOutcome.OK:
                self._throttled = False  # caught up within its budget
                self._clear_stale()
            else:
                resync = outcome in (ReplayOutcome.PARTIAL, ReplayOutcome.NO_ENDPOINT)
                self._mark_gap_stale(f"replay_{outcome.value}", resync=resync)
        elif kind is ReplayKind.TAIL:
            self._quiet_since = self._clock()
            if outcome is ReplayOutcome.PARTIAL and self.last is not None:
                # Batches after `last` were published and are gone from the buffer.
                self._mark_gap_stale("replay_partial", resync=True)
            # timeout/error: nothing learned; the next quiet period asks again
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        seq, payload, may_restart = pending
        if kind is not ReplayKind.GAP:  # a bootstrap that a live batch asked for
            return self._continue_live(seq, payload, may_restart)
        last = self.last
        assert last is not None  # a gap replay starts from a base and never resets it
        if seq <= last:  # the replay included it: its bytes must be the replayed ones
            return self._overlap(seq, payload, None, may_restart)
        if seq == last + 1:
            self._apply(seq, payload)
            return None
        if outcome is ReplayOutcome.OK:
            outcome = ReplayOutcome.PARTIAL  # the end marker came before the live seq
        self._mark_gap_stale(
            f"replay_{outcome.value}",
            resync=outcome in (ReplayOutcome.PARTIAL, ReplayOutcome.NO_ENDPOINT),
        )
        self._hold(seq, payload)
        return None

    def _replay_over_budget(self, request: ReplayRequest) -> ReplayRequest | None:
        """A replay stopped where the budget ran out: what it applied is a consistent prefix of
        the engine's history, not its present (blocks removed since are still held), so the
        source is gap-stale and asks for the rest once the budget allows."""
        if request.kind is ReplayKind.BOOTSTRAP:
            self.settled = True
        self._mark_gap_stale(
            "replay_over_budget", resync=self.last is None, not_before=self._budget.ready_at()
        )
        pending, self._pending = self._pending, None
        if pending is not None:
            self._hold(pending[0], pending[1])  # dropped unless it clears everything
        return None

    # --- timers -----------------------------------------------------------------------------

    def _tail_due(self) -> float | None:
        period = self._timings.tail_check_s
        if (
            period <= 0
            or not self._has_replay
            or not self.connected
            or self._gap_stale is not None
            or self._pending is not None
        ):
            return None
        since = self._quiet_since
        if self._last_batch_t is not None and self._last_batch_t > since:
            since = self._last_batch_t
        return since + period

    def tick(self) -> ReplayRequest | None:
        """Fire what is due: a stale source's retry, or the tail check of a quiet source (vLLM
        sends no heartbeat, so a lost last batch is otherwise never noticed)."""
        now = self._clock()
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            if self._resync_on_retry:
                # The buffer moved past last + 1 (or there is none): start over as a late
                # joiner, which holds a safe subset of the engine's cache.
                self.reset(ResetCause.RESYNC)
                return self._bootstrap()
            assert self.last is not None
            return ReplayRequest(self.last + 1, ReplayKind.RETRY)
        due = self._tail_due()
        if due is not None and now >= due:
            self._quiet_since = now
            start = 0 if self.last is None else self.last + 1
            return ReplayRequest(start, ReplayKind.TAIL)
        return None


def _last_clear(batch: EventBatch) -> int | None:
    found = None
    for i, event in enumerate(batch.events):
        if type(event) is AllBlocksCleared:
            found = i
    return found
