"""`SourceTracker.on_live_run` (a native receive slice applied as one index batch) against
`on_live` item by item: seeded streams with every uncommon case mixed in, same observable
state (index holdings, counters, seq, staleness) after every slice. Injected clock, no sockets."""

from __future__ import annotations

import random
from collections.abc import Sequence

import msgspec
import pytest

from kvroute.core import IngestLimits
from kvroute.events import (
    SourceTracker,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEventBatch,
    encode_batch,
)
from kvroute.events import tracker as tracker_module
from kvroute.events.budget import IngestBudget
from tests.unit.events.test_tracker import SOURCE, TIMINGS, Engine, Rig

Item = tuple[int, bytes] | None


@pytest.fixture(params=["c", "python"])
def run_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """on_live_run's loop: `_recv.take_run` (C), or `SourceTracker._take_run` (its reference)."""
    if request.param == "python":
        monkeypatch.setattr(tracker_module, "_take_run", None)
    elif tracker_module._take_run is None:
        pytest.skip("the events extension is not built")
    return str(request.param)


def _rig(limits: IngestLimits) -> Rig:
    rig = Rig()
    rig.tracker = SourceTracker(
        rig.tracker.spec,
        rig.index,
        rig.counters,
        TIMINGS,
        rig.clock,
        budget=IngestBudget(limits, rig.clock),
    )
    return rig


def _with_unknown_kind(payload: bytes) -> bytes:
    ts, events, rank = msgspec.msgpack.decode(payload)
    return msgspec.msgpack.encode(
        [ts, [*events, {"type": "BlockMoved", "block_hashes": [1]}], rank]
    )


def _stream(rng: random.Random, n: int) -> tuple[list[Item], list[tuple[int, bytes]]]:
    """What a SUB socket hands over: mostly the next batch, with every uncommon case; and
    everything the engine sent, in seq order."""
    engine = Engine()
    items: list[Item] = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.03:
            items.append(None)  # bad frames
        elif roll < 0.05:
            engine.batch()  # lost: a gap
        elif roll < 0.07 and engine.sent:
            items.append(engine.sent[-1])  # a duplicate
        elif roll < 0.09:
            seq = len(engine.sent)
            engine.sent.append((seq, b"\x93\xcb garbage"))
            items.append((seq, b"\x93\xcb garbage"))  # malformed
        elif roll < 0.11:
            items.append(engine.clear())
        elif roll < 0.13:
            seq, payload = engine.batch()
            rank1 = encode_batch(VllmEventBatch(1.0, [VllmBlockRemoved([seq])], 1))
            engine.sent[-1] = (seq, rank1)
            items.append((seq, rank1))  # another rank's batch
        elif roll < 0.15:
            seq, payload = engine.batch()
            engine.sent[-1] = (seq, _with_unknown_kind(payload))
            items.append(engine.sent[-1])
        elif roll < 0.17:
            many = [VllmBlockStored([10_000 + seq], None, [1, 2, 3, 4], 4) for seq in range(6)]
            items.append(engine.batch(many))  # over max_batch_events when limited
        else:
            items.append(engine.batch())
    return items, engine.sent


def _deliver_one(rig: Rig, engine: Engine, item: Item) -> None:
    if item is None:
        rig.tracker.on_bad_frames()
        return
    rig.serve(rig.tracker.on_live(*item), engine)


def _deliver_slice(rig: Rig, engine: Engine, items: Sequence[Item]) -> None:
    """As events/subscriber.py's `_drain_native` does with one received slice."""
    at = 0
    while at < len(items):
        ran = rig.tracker.on_live_run(items, at)
        if ran == at:
            _deliver_one(rig, engine, items[at])
            at += 1
        else:
            at = ran


def _observed(rig: Rig) -> tuple[object, ...]:
    c = rig.counters
    holdings = sorted((int(h), m) for h, m in rig.index.holdings(SOURCE))
    return (
        holdings,
        rig.tracker.last,
        rig.tracker.stale_reason(),
        dict(c.batches),
        dict(c.applied),
        dict(c.dropped),
        dict(c.seq_gaps),
        dict(c.replays),
        dict(c.resets),
        dict(c.rank_mismatches),
    )


LIMITS = {
    "none": IngestLimits(),
    "batch size": IngestLimits(max_batch_events=4),
    # about 40 one-block batches a second: the clock below crosses it both ways
    "budget": IngestLimits(source_bytes_per_s=4000.0, source_events_per_s=60.0, burst_s=1.0),
}


@pytest.mark.parametrize("limits", list(LIMITS), ids=list(LIMITS))
@pytest.mark.parametrize("seed", range(12))
def test_a_slice_as_one_batch_is_item_by_item(seed: int, limits: str, run_loop: str) -> None:
    rng = random.Random(seed)
    items, sent = _stream(rng, 400)
    one, run = _rig(LIMITS[limits]), _rig(LIMITS[limits])
    engine = Engine()  # its replay buffer: what was sent up to the slice being delivered
    for rig in (one, run):
        rig.attach(engine)
    at = 0
    taken_by_runs = 0
    while at < len(items):
        size = rng.choice((1, 2, 5, 32))
        chunk = items[at : at + size]
        at += size
        newest = max((i[0] for i in chunk if i is not None), default=-1)
        engine.sent = [
            s for s in sent if s[0] <= max(newest, engine.sent[-1][0] if engine.sent else -1)
        ]
        for item in chunk:
            _deliver_one(one, engine, item)
        before = run.counters.batches[SOURCE]
        _deliver_slice(run, engine, chunk)
        taken_by_runs += run.counters.batches[SOURCE] - before
        assert _observed(run) == _observed(one), f"seed {seed}, slice ending at item {at}"
        step = rng.choice((0.0, 0.01, 0.2))
        for rig in (one, run):
            rig.clock.t += step
    assert taken_by_runs > 0


def test_a_run_stops_at_the_first_uncommon_item_and_takes_the_rest_next(run_loop: str) -> None:
    rig = Rig()
    engine = Engine()
    rig.attach(engine)
    base = engine.batch()
    assert rig.tracker.on_live_run([base], 0) == 0  # no base yet: on_live's to take
    assert rig.tracker.on_live(*base) is None
    items: list[Item] = [engine.batch(), engine.batch(), None, engine.batch()]
    assert rig.tracker.on_live_run(items, 0) == 2
    assert rig.counters.batches[SOURCE] == 3
    assert rig.tracker.on_live_run(items, 2) == 2  # bad frames: left to the caller
    assert rig.tracker.on_live_run(items, 3) == 4
    assert rig.tracker.last == items[3][0]  # type: ignore[index]
    assert {int(h) for h, _ in rig.index.holdings(SOURCE)} == engine.reference()


def _odd_payloads() -> list[bytes]:
    """Map payloads the raw decode takes but its verdict does not call plain, or that it refuses
    (a LoRA, an upper-case medium, token ids past uint32, nil or not ints, a cleared event)."""
    out = []
    for event in (
        {"lora_id": 3},
        {"medium": "CPU_TIER"},
        {"medium": "cpu"},
        {"token_ids": [1, 2, 3, 1 << 40]},
        {"token_ids": None},
        {"token_ids": ["a", "b", "c", "d"]},
        {"extra_keys": [None, None, None, None]},
    ):
        base = {"type": "BlockStored", "block_hashes": [7], "parent_block_hash": None}
        base.update({"token_ids": [1, 2, 3, 4], "block_size": 4, "lora_id": None})
        base.update({"medium": "GPU", **event})
        out.append(msgspec.msgpack.encode([1.0, [base], 0]))
    out.append(msgspec.msgpack.encode([1.0, [{"type": "AllBlocksCleared"}], 0]))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_take_run_with_plain_parts_is_take_run_through_decode(seed: int) -> None:
    """`_recv.take_run` given the decoder's plain parts (the raw map decode and its verdict,
    called from C) against the same call without them (every payload through
    `BatchDecoder.decode`): same run, same batches, on streams with every uncommon case; and
    the plain payloads did not go through `decode`."""
    from kvroute.events.wire import BatchDecoder
    from kvroute.index.impl import native_error

    take_run = tracker_module._take_run
    if take_run is None or native_error():
        pytest.skip("the native extensions are not built")
    rng = random.Random(seed)
    items, _ = _stream(rng, 300)
    odd = _odd_payloads()
    for k in range(len(items)):  # some of the odd payloads in place of a batch, same seq
        item = items[k]
        if item is not None and rng.random() < 0.1:
            items[k] = (item[0], rng.choice(odd))
    decoder = BatchDecoder(raw_tokens=True)
    parts = decoder.plain_parts()
    assert parts is not None
    calls = [0]

    def decode(payload: bytes) -> object:
        calls[0] += 1
        return decoder.decode(payload)

    from kvroute.core import AllBlocksCleared
    from kvroute.errors import WireError

    taken = 0
    for at, item in enumerate(items):
        if item is None:
            continue
        common = (items, at, item[0] - 1, decode, -1, None, 0, AllBlocksCleared, WireError)
        calls[0] = 0
        with_parts = take_run(*common, parts)
        through_parts = calls[0]
        calls[0] = 0
        without = take_run(*common)
        assert with_parts == without, f"seed {seed}, at {at}"
        assert through_parts <= calls[0]
        taken += with_parts[0] - at
        if with_parts[0] > at + 1:
            assert through_parts < calls[0]  # plain ones were taken without `decode`
    assert taken > 0
    # A source that sends array-shaped events: its decoder tries that shape first, no parts.
    array_payload = msgspec.msgpack.encode([1.0, [["BlockRemoved", [1], "GPU"]], 0])
    decoder.decode(array_payload)
    assert decoder.plain_parts() is None
