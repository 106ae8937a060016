"""The recovery rules of docs/design.md §5, one table-driven test each, on `SourceTracker` alone:
no sockets, no sleeps; time is an injected clock. Then the three defects it fixed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from kvroute.core import (
    DropReason,
    EventCounters,
    ReplayOutcome,
    ResetCause,
    SourceSpec,
    source_id,
)
from kvroute.events import (
    RecoveryTimings,
    ReplayKind,
    ReplayRequest,
    SourceTracker,
    VllmAllBlocksCleared,
    VllmBlockStored,
    VllmEvent,
    VllmEventBatch,
    decode_batch,
    encode_batch,
)
from tests.index_impl import new_index

MODEL = "m"
BS = 4
SOURCE = source_id("e", 0)
TIMINGS = RecoveryTimings(backoff_min_s=0.5, backoff_max_s=4.0, tail_check_s=5.0)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Engine:
    """A scripted engine process: each batch stores one block, chained to the last one except
    every fourth, which starts a new prefix (so a late joiner can hold something); it keeps a
    replay buffer of its last `window` batches, as vLLM's publisher does."""

    first_token: int = 0
    window: int = 1000
    sent: list[tuple[int, bytes]] = field(default_factory=list)
    _next_hash: int = 1

    def batch(self, events: Sequence[VllmEvent] | None = None) -> tuple[int, bytes]:
        if events is None:
            parent = self._next_hash - 1 if self._next_hash % 4 != 1 else None
            tokens = [self.first_token + self._next_hash * BS + i for i in range(BS)]
            events = [VllmBlockStored([self._next_hash], parent, tokens, BS)]
            self._next_hash += 1
        item = (len(self.sent), encode_batch(VllmEventBatch(1.0, list(events), 0)))
        self.sent.append(item)
        return item

    def clear(self) -> tuple[int, bytes]:
        self._next_hash = 1
        return self.batch([VllmAllBlocksCleared()])

    def buffer(self, start: int) -> list[tuple[int, bytes]]:
        return [b for b in self.sent[-self.window :] if b[0] >= start]

    def reference(self) -> set[int]:
        """Local hashes an index holds after applying every batch sent, in order, no loss."""
        index = new_index()
        index.add_source(SOURCE, engine="e", model=MODEL)
        for _seq, payload in self.sent:
            index.apply(SOURCE, decode_batch(payload))
        return {int(h) for h, _m in index.holdings(SOURCE)}


class Rig:
    """One tracker over a real index, with helpers that play the socket layer's part."""

    def __init__(self, *, replay: bool = True, timings: RecoveryTimings = TIMINGS) -> None:
        self.clock = Clock()
        self.counters = EventCounters()
        self.index = new_index(counters=self.counters)
        self.index.add_source(SOURCE, engine="e", model=MODEL)
        spec = SourceSpec(
            engine="e",
            model=MODEL,
            endpoint="tcp://e:1",
            replay_endpoint="tcp://e:2" if replay else None,
        )
        self.tracker = SourceTracker(spec, self.index, self.counters, timings, self.clock)
        self.requests: list[ReplayRequest] = []

    def serve(
        self, request: ReplayRequest | None, engine: Engine, *, complete: bool = True
    ) -> None:
        """Answer replay requests from `engine`'s buffer until the tracker asks for no more."""
        while request is not None:
            self.requests.append(request)
            request = self.tracker.on_replay(request, engine.buffer(request.start), complete)

    def live(self, engine: Engine, item: tuple[int, bytes]) -> ReplayRequest | None:
        return self.tracker.on_live(*item)

    def held(self) -> set[int]:
        return {int(h) for h, _m in self.index.holdings(SOURCE)}

    def dropped(self, reason: DropReason) -> int:
        return self.counters.dropped[(SOURCE, reason.value)]

    def resets(self, cause: ResetCause) -> int:
        return self.counters.resets[(SOURCE, cause.value)]

    def replays(self, outcome: ReplayOutcome) -> int:
        return self.counters.replays[(SOURCE, outcome.value)]

    def assert_single_owner(self) -> None:
        assert self.index.is_stale(SOURCE) == self.tracker.stale
        assert (self.index.stale_engines() == {"e"}) == self.tracker.stale

    def attach(self, engine: Engine) -> None:
        """Connect and bootstrap."""
        self.serve(self.tracker.on_connect(), engine)

    def gap(self, engine: Engine) -> ReplayRequest:
        """Attach, take one live batch, lose the next: the batch after it asks for a replay."""
        self.attach(engine)
        self.live(engine, engine.batch())
        engine.batch()  # lost
        request = self.live(engine, engine.batch())
        assert request is not None and request.kind is ReplayKind.GAP
        return request


# --- §5, one rule at a time --------------------------------------------------------------------


def test_first_contact_bootstraps_from_seq_0_then_follows_live() -> None:
    rig, engine = Rig(), Engine()
    for _ in range(3):
        engine.batch()
    request = rig.tracker.on_connect()
    assert request == ReplayRequest(0, ReplayKind.BOOTSTRAP)
    rig.serve(request, engine)
    assert rig.tracker.last == 2
    assert rig.live(engine, engine.batch()) is None
    assert rig.tracker.last == 3 and rig.held() == engine.reference()
    assert rig.replays(ReplayOutcome.OK) == 1


def test_a_bootstrap_whose_buffer_no_longer_reaches_0_holds_a_subset() -> None:
    rig, engine = Rig(), Engine(window=2)
    for _ in range(5):
        engine.batch()
    rig.attach(engine)
    assert rig.tracker.last == 4 and not rig.tracker.stale
    # The first retained batch chains from a block we never saw: an orphan, counted, not held.
    assert rig.held() < engine.reference()
    assert rig.dropped(DropReason.ORPHAN) >= 1


@pytest.mark.parametrize("replay", [True, False], ids=["replay", "no_replay"])
def test_next_seq_is_applied_at_once(replay: bool) -> None:
    rig, engine = Rig(replay=replay), Engine()
    rig.attach(engine)
    for _ in range(4):
        assert rig.live(engine, engine.batch()) is None
    assert rig.held() == engine.reference()
    assert rig.counters.batches[SOURCE] == 4


def test_a_gap_is_replayed_in_order_deduplicated_then_the_live_batch() -> None:
    rig, engine = Rig(), Engine()
    rig.attach(engine)
    rig.live(engine, engine.batch())
    lost = [engine.batch() for _ in range(3)]  # never arrive live
    request = rig.live(engine, engine.batch())
    assert request == ReplayRequest(lost[0][0], ReplayKind.GAP)
    rig.serve(request, engine)  # the buffer also returns the live batch: a duplicate
    assert rig.tracker.last == 4 and not rig.tracker.stale
    assert rig.held() == engine.reference()
    assert rig.counters.seq_gaps[SOURCE] == 1
    assert rig.dropped(DropReason.DUPLICATE) == 1


def test_seq_going_backwards_is_a_restart_that_resets_and_bootstraps() -> None:
    rig, old = Rig(), Engine()
    rig.attach(old)
    for _ in range(3):
        rig.live(old, old.batch())
    new = Engine(first_token=10_000)  # a new process: seq from 0, other contents
    request = rig.live(new, new.batch())
    assert request == ReplayRequest(0, ReplayKind.BOOTSTRAP)
    assert rig.resets(ResetCause.SEQ_BACKWARDS) == 1
    rig.serve(request, new)
    assert rig.held() == new.reference()
    assert not rig.held() & old.reference()


def test_a_disconnect_resets_and_the_next_connect_bootstraps() -> None:
    rig, engine = Rig(), Engine()
    rig.attach(engine)
    rig.live(engine, engine.batch())
    rig.tracker.on_disconnect()
    assert rig.held() == set() and rig.tracker.last is None and not rig.tracker.connected
    assert rig.resets(ResetCause.DISCONNECT) == 1
    assert rig.tracker.on_connect() == ReplayRequest(0, ReplayKind.BOOTSTRAP)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [("timeout", "replay_timeout"), ("error", "replay_error"), ("partial", "replay_partial")],
)
def test_a_gap_replay_cannot_close_makes_the_source_stale_and_holds_live_batches(
    answer: str, reason: str
) -> None:
    rig, engine = Rig(), Engine()
    request = rig.gap(engine)
    if answer == "timeout":
        rig.tracker.on_replay(request, [], complete=False)
    elif answer == "error":
        rig.tracker.on_replay_failed(request, ReplayOutcome.ERROR)
    else:  # the buffer moved past the gap
        rig.tracker.on_replay(request, engine.buffer(request.start)[2:], complete=True)
    assert rig.tracker.stale and rig.tracker.stale_reason() == reason
    rig.assert_single_owner()
    assert rig.index.match(MODEL, None, list(range(64))) == {}
    rig.live(engine, engine.batch())
    assert rig.dropped(DropReason.STALE_SOURCE) >= 2  # the revealing batch and this one


def test_a_stale_source_retries_with_backoff_and_recovers_on_success() -> None:
    rig, engine = Rig(), Engine()
    request = rig.gap(engine)
    rig.tracker.on_replay(request, [], complete=False)
    deadline = rig.tracker.next_deadline()
    assert deadline == pytest.approx(rig.clock.t + TIMINGS.backoff_min_s)
    assert rig.tracker.tick() is None  # not yet
    rig.clock.t = deadline
    retry = rig.tracker.tick()
    assert retry == ReplayRequest(1, ReplayKind.RETRY)  # last + 1: the lost batch
    rig.tracker.on_replay(retry, [], complete=False)  # fails again: the backoff doubles
    assert rig.tracker.next_deadline() == pytest.approx(rig.clock.t + 2 * TIMINGS.backoff_min_s)
    rig.clock.t = rig.tracker.next_deadline() or 0.0
    rig.serve(rig.tracker.tick(), engine)
    assert not rig.tracker.stale and rig.held() == engine.reference()
    rig.assert_single_owner()


def test_a_retry_whose_buffer_moved_on_resyncs_as_a_late_joiner() -> None:
    rig, engine = Rig(), Engine(window=3)
    rig.attach(engine)
    rig.live(engine, engine.batch())
    for _ in range(5):
        engine.batch()  # lost, and soon gone from the buffer
    request = rig.live(engine, engine.batch())
    rig.serve(request, engine)
    assert rig.tracker.stale_reason() == "replay_partial"
    rig.clock.t = rig.tracker.next_deadline() or 0.0
    request = rig.tracker.tick()
    assert request == ReplayRequest(0, ReplayKind.BOOTSTRAP)
    assert rig.resets(ResetCause.RESYNC) == 1
    rig.serve(request, engine)
    assert not rig.tracker.stale
    assert rig.held() <= engine.reference()  # a subset: never a block the engine lacks


def test_without_a_replay_endpoint_a_gap_goes_stale_then_resyncs_on_the_next_batch() -> None:
    rig, engine = Rig(replay=False), Engine()
    rig.attach(engine)
    rig.live(engine, engine.batch())
    engine.batch()
    assert rig.live(engine, engine.batch()) is None
    assert rig.tracker.stale_reason() == "replay_no_endpoint"
    assert rig.replays(ReplayOutcome.NO_ENDPOINT) == 1
    rig.clock.t = rig.tracker.next_deadline() or 0.0
    assert rig.tracker.tick() is None  # reset; the next live batch is the base
    assert rig.resets(ResetCause.RESYNC) == 1 and not rig.tracker.stale
    rig.live(engine, engine.batch())
    assert rig.tracker.last == 3 and rig.held() <= engine.reference()


def test_a_live_all_blocks_cleared_ends_gap_staleness_as_a_fresh_base() -> None:
    rig, engine = Rig(), Engine()
    rig.attach(engine)
    rig.live(engine, engine.batch())
    engine.batch()
    rig.tracker.on_replay(
        rig.live(engine, engine.batch()) or ReplayRequest(0, ReplayKind.GAP), [], False
    )
    assert rig.tracker.stale
    rig.live(engine, engine.clear())
    assert not rig.tracker.stale and rig.held() == set()
    rig.live(engine, engine.batch())
    assert rig.held() == engine.reference()
    rig.assert_single_owner()


def test_a_malformed_batch_consumes_its_seq_and_only_a_clear_or_reset_ends_it() -> None:
    rig, engine = Rig(), Engine()
    rig.attach(engine)
    rig.live(engine, engine.batch())
    bad = (len(engine.sent), b"\xc1not msgpack")
    engine.sent.append(bad)
    assert rig.live(engine, bad) is None
    assert rig.tracker.last == 1 and rig.tracker.stale_reason() == "malformed"
    assert rig.dropped(DropReason.MALFORMED) == 1
    rig.assert_single_owner()
    rig.live(engine, engine.batch())  # keeps flowing while stale
    assert rig.tracker.stale
    rig.live(engine, engine.clear())
    assert not rig.tracker.stale
    assert rig.resets(ResetCause.ALL_BLOCKS_CLEARED) == 1
    rig.assert_single_owner()


def test_unknown_kinds_and_unsupported_extra_keys_are_counted() -> None:
    rig, engine = Rig(), Engine()
    rig.attach(engine)
    multimodal = VllmBlockStored([99], None, [1, 2, 3, 4], BS, extra_keys=[[("mm", 0)]])
    rig.live(engine, engine.batch([multimodal]))
    assert rig.dropped(DropReason.UNSUPPORTED_EXTRA_KEYS) == 1
    assert rig.held() == set()


def test_a_quiet_source_checks_its_tail_and_costs_one_end_marker_when_nothing_was_lost() -> None:
    rig, engine = Rig(), Engine()
    rig.attach(engine)
    rig.live(engine, engine.batch())
    assert rig.tracker.next_deadline() == pytest.approx(rig.clock.t + TIMINGS.tail_check_s)
    rig.clock.t += TIMINGS.tail_check_s
    request = rig.tracker.tick()
    assert request == ReplayRequest(1, ReplayKind.TAIL)
    rig.serve(request, engine)
    assert rig.counters.seq_gaps[SOURCE] == 0 and rig.replays(ReplayOutcome.OK) == 2
    # Still quiet: asked again one period later, not before.
    assert rig.tracker.tick() is None
    rig.clock.t += TIMINGS.tail_check_s
    assert rig.tracker.tick() == ReplayRequest(1, ReplayKind.TAIL)


def test_tail_checks_are_off_at_0_and_without_a_replay_endpoint() -> None:
    for rig in (Rig(timings=RecoveryTimings(0.5, 4.0, 0.0)), Rig(replay=False)):
        rig.attach(Engine())
        rig.clock.t += 3600
        assert rig.tracker.next_deadline() is None and rig.tracker.tick() is None


def test_index_staleness_follows_the_tracker_through_every_transition() -> None:
    rig, engine = Rig(), Engine(window=2)
    rig.attach(engine)
    steps = 0
    for round_ in range(30):
        item = engine.batch() if round_ % 7 else (len(engine.sent), b"\xc1")
        if round_ % 7 == 0:
            engine.sent.append(item)
        if round_ % 5 == 3:
            continue  # lost
        request = rig.live(engine, item)
        rig.serve(request, engine, complete=round_ % 2 == 0)
        rig.assert_single_owner()
        rig.clock.t += 1.0
        rig.serve(rig.tracker.tick(), engine)
        rig.assert_single_owner()
        if round_ % 11 == 0:
            rig.live(engine, engine.clear())
            rig.assert_single_owner()
        steps += 1
    assert steps > 20


# --- the defects this state machine fixed (each failed on the code before it) -------------------


def test_regression_a_clear_in_an_unfinished_retry_replay_keeps_the_source_stale() -> None:
    """Staleness lived in the subscriber and in the index; the index cleared its own bit on any
    AllBlocksCleared, so a retry replay holding a clear but no end marker left the subscriber
    stale while `match` counted the source's blocks: a false hold."""
    rig, engine = Rig(), Engine()
    request = rig.gap(engine)
    rig.tracker.on_replay(request, [], complete=False)  # the gap cannot be closed: stale
    engine.clear()
    engine.batch()
    engine.batch()
    rig.clock.t = rig.tracker.next_deadline() or 0.0
    retry = rig.tracker.tick()
    assert retry is not None and retry.kind is ReplayKind.RETRY
    # The retry returns the rest of the buffer, clear and stores included, then the end
    # marker is lost: later batches may exist that the held-back live stream never delivered.
    rig.tracker.on_replay(retry, engine.buffer(retry.start), complete=False)
    assert rig.held()  # the replayed stores were applied ...
    assert rig.tracker.stale  # ... but do not count
    assert rig.index.is_stale(SOURCE)
    rig.assert_single_owner()
    prompt = [engine.first_token + 1 * BS + i for i in range(BS)]  # block 1 after the clear
    assert rig.index.match(MODEL, None, prompt) == {}


def test_regression_a_lost_final_batch_is_noticed_and_repaired_when_the_source_goes_quiet() -> None:
    """vLLM sends no heartbeat: with the last batch before a quiet period lost, no later batch
    reveals the gap, and the index kept blocks the engine had evicted."""
    rig, engine = Rig(), Engine()
    rig.attach(engine)
    for _ in range(3):
        rig.live(engine, engine.batch())
    engine.clear()  # the engine dropped everything; this batch is lost
    assert rig.held() and not engine.reference()
    rig.clock.t += TIMINGS.tail_check_s
    request = rig.tracker.tick()
    assert request == ReplayRequest(3, ReplayKind.TAIL)
    rig.serve(request, engine)
    assert rig.held() == engine.reference() == set()
    assert rig.counters.seq_gaps[SOURCE] == 1
    # Within the default 10 s: one tail period (5 s) plus the replay.
    assert TIMINGS.tail_check_s + 2.0 <= 10.0


def test_regression_live_backlog_older_than_a_resync_bootstrap_is_not_a_restart() -> None:
    """Under a flood, after a resync bootstrapped from the replay buffer, older live batches
    still queued on the SUB socket arrived with seq <= last and were taken for an engine restart:
    a reset and another full bootstrap each, until the source held nothing."""
    rig, engine = Rig(), Engine(window=50)
    rig.attach(engine)
    rig.live(engine, engine.batch())
    for _ in range(10):
        engine.batch()  # lost: the SUB socket overflowed
    queued = [engine.batch() for _ in range(100)]  # still queued on the socket, in order
    request = rig.live(engine, queued[0])
    rig.serve(request, engine)  # the buffer (last 50) no longer reaches the gap
    assert rig.tracker.stale_reason() == "replay_partial"
    rig.clock.t = rig.tracker.next_deadline() or 0.0
    rig.serve(rig.tracker.tick(), engine)  # resync: bootstrap from the buffer
    assert not rig.tracker.stale
    bootstrapped = rig.held()
    assert bootstrapped
    for item in queued[1:]:  # the backlog, older than (or inside) the bootstrap window
        assert rig.live(engine, item) is None
    assert rig.resets(ResetCause.SEQ_BACKWARDS) == 0
    assert rig.held() == bootstrapped
    rig.live(engine, engine.batch())
    assert rig.tracker.last == len(engine.sent) - 1 and not rig.tracker.stale
    # A real restart (seq below the live stream) is still one.
    new = Engine(first_token=77_000)
    rig.serve(rig.live(new, new.batch()), new)
    assert rig.resets(ResetCause.SEQ_BACKWARDS) == 1
    assert rig.held() == new.reference()


def test_a_source_is_settled_once_its_first_bootstrap_ends_and_stays_settled() -> None:
    rig, engine = Rig(), Engine()
    engine.batch()
    assert not rig.tracker.settled  # not even connected
    request = rig.tracker.on_connect()
    assert request is not None and not rig.tracker.settled  # the replay is out
    rig.serve(request, engine)
    assert rig.tracker.settled
    rig.tracker.on_disconnect()  # a later reset does not take readiness back
    assert rig.tracker.settled
    failed = Rig()
    first = failed.tracker.on_connect()
    assert first is not None
    failed.tracker.on_replay_failed(first, ReplayOutcome.ERROR)  # given up on: settled too
    assert failed.tracker.settled
    no_replay = Rig(replay=False)
    assert not no_replay.tracker.settled
    no_replay.tracker.on_connect()  # nothing to replay
    assert no_replay.tracker.settled
