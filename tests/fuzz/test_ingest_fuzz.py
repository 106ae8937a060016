"""Generated and mutated payloads through decode → tracker → index, with the index's invariants
checked after each: never an exception, staleness owned by the tracker alone, and the native
index equal to the Python reference model on every observable. `make test` runs 20,000;
`make fuzz` runs 10⁶ (KVROUTE_INGEST_FUZZ_PAYLOADS)."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable

import pytest

from kvroute.core import EventCounters, IngestLimits, SourceSpec, source_id
from kvroute.events import ReplayRequest, SourceTracker, encode_batch
from kvroute.events.budget import IngestBudget
from kvroute.events.tracker import RecoveryTimings
from kvroute.index import PrefixIndex
from kvroute.index.impl import IndexImpl, create_index, native_error
from kvroute.index.limits import IndexLimits
from tests.event_streams import EngineStream
from tests.shared_fixtures import scenarios
from tests.unit.events.test_wire_fuzz import (
    _bit_flips,
    _byte_edits,
    _random_payload,
    _truncate_or_splice,
)

SEED = 20261207
PAYLOADS = int(os.environ.get("KVROUTE_INGEST_FUZZ_PAYLOADS", "20000"))
MODEL = "m"
SOURCE = source_id("e", 0)
RELEASES = ("0.9.0", "0.22.0", "0.26.0", "0.33.0")
TIMINGS = RecoveryTimings(backoff_min_s=0.5, backoff_max_s=4.0, tail_check_s=5.0)
# Small limits, so the fuzz reaches the budget and size refusals too.
LIMITS = IngestLimits(
    source_events_per_s=2_000.0,
    source_bytes_per_s=200_000.0,
    burst_s=1.0,
    max_batch_events=64,
    max_batch_blocks=256,
)


class _Side:
    """One index implementation behind its own tracker, fed the same inputs as the other."""

    def __init__(self, impl: IndexImpl, clock: Callable[[], float]) -> None:
        self.counters = EventCounters()
        self.index: PrefixIndex = create_index(
            IndexLimits(max_blocks_per_source=4_096), impl=impl, counters=self.counters
        )
        self.index.add_source(SOURCE, engine="e", model=MODEL)
        spec = SourceSpec(
            engine="e", model=MODEL, endpoint="tcp://e:1", replay_endpoint="tcp://e:2"
        )
        self.tracker = SourceTracker(
            spec,
            self.index,
            self.counters,
            TIMINGS,
            clock,
            budget=IngestBudget(LIMITS, clock),
        )

    def feed(self, seq: int, payload: bytes, buffer: list[tuple[int, bytes]]) -> None:
        request = self.tracker.on_live(seq, payload)
        self._serve(request, buffer)

    def tick(self, buffer: list[tuple[int, bytes]]) -> None:
        self._serve(self.tracker.tick(), buffer)

    def _serve(self, request: ReplayRequest | None, buffer: list[tuple[int, bytes]]) -> None:
        for _ in range(8):  # a replay may ask for another; a bounded chain
            if request is None:
                return
            replayed = [item for item in buffer if item[0] >= request.start]
            request = self.tracker.on_replay(request, replayed, complete=True)
        assert request is None, "the tracker kept asking for replays"

    def observed(self) -> tuple[object, ...]:
        index = self.index
        return (
            self.tracker.last,
            self.tracker.stale,
            self.tracker.stale_reason(),
            sorted((int(h), m) for h, m in index.holdings(SOURCE)),
            index.is_stale(SOURCE),
            sorted(self.counters.dropped.items()),
            sorted(self.counters.resets.items()),
        )


def _payloads(rng: random.Random, seeds: list[bytes]) -> Callable[[], bytes]:
    stream = EngineStream(SEED)

    def next_payload() -> bytes:
        roll = rng.random()
        if roll < 0.7:  # a well-formed batch of some release
            batch = stream.clear() if rng.random() < 0.02 else stream.batch(rng.randint(1, 6))
            return encode_batch(batch, rng.choice(RELEASES))
        base = rng.choice(seeds)
        if roll < 0.77:
            return _bit_flips(rng, base)
        if roll < 0.84:
            return _byte_edits(rng, base)
        if roll < 0.89:
            return _truncate_or_splice(rng, base, seeds)
        if roll < 0.97:
            return _random_payload(rng)
        # Large ones: many events, many blocks, or deep nesting.
        kind = rng.randrange(3)
        if kind == 0:
            return encode_batch(stream.batch(rng.randint(65, 120)), "0.33.0")
        if kind == 1:
            return b"\x93\xcb" + b"\x00" * 8 + b"\x91" * rng.randint(1_000, 5_000) + b"\xc0"
        return encode_batch(stream.batch(rng.randint(1, 4)), "0.33.0") * rng.randint(2, 9)

    return next_payload


def _seq(rng: random.Random, last: int) -> int:
    roll = rng.random()
    if roll < 0.85:
        return last + 1
    if roll < 0.93:
        return last + rng.randint(2, 5)  # a gap
    if roll < 0.97:
        return max(0, last - rng.randint(0, 3))  # overlap or a restart
    return rng.randrange(0, 2**64)


@pytest.mark.skipif(native_error() is not None, reason="the native index is not built")
def test_mutated_and_generated_payloads_keep_the_index_consistent_and_both_models_equal() -> None:
    rng = random.Random(SEED)
    now = [1_000.0]

    def clock() -> float:
        return now[0]

    native, python = _Side("native", clock), _Side("python", clock)
    next_payload = _payloads(rng, [s.payload for s in scenarios()])
    buffer: list[tuple[int, bytes]] = []  # what the "engine" would replay
    seq = -1
    started = time.perf_counter()
    for i in range(PAYLOADS):
        seq = _seq(rng, seq) if seq >= 0 else 0
        payload = next_payload()
        buffer.append((seq, payload))
        if len(buffer) > 64:
            del buffer[0]
        for side in (native, python):
            side.feed(seq, payload, buffer)
        now[0] += rng.choice((0.0, 0.0, 0.0002, 0.002))
        if i % 50 == 0:
            now[0] += rng.choice((0.0, 1.0, 6.0))  # retries and tail checks fall due
            for side in (native, python):
                side.tick(buffer)
        for side in (native, python):
            assert side.index.is_stale(SOURCE) == side.tracker.stale, (i, payload.hex())
        if i % 10 == 0 or i == PAYLOADS - 1:
            assert native.observed() == python.observed(), (i, seq, payload.hex())
        seq = max(seq, 0)
    elapsed = time.perf_counter() - started
    counters = native.counters
    print(f"\n{PAYLOADS:,} payloads through both indexes in {elapsed:.1f} s")
    print("applied", dict(counters.applied), "dropped", dict(counters.dropped))
    print("resets", dict(counters.resets), "replays", dict(counters.replays))
    assert native.counters.batches[SOURCE] > 0
