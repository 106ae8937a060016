"""The three recovery defects of the subscriber before `SourceTracker`, over real sockets: a false
hold after an unfinished retry, a lost final batch, and backlog taken for a restart."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import zmq.asyncio

from kvroute.core import EventCounters, ResetCause, SourceSpec, source_id
from kvroute.events import (
    SubscriberManager,
    VllmAllBlocksCleared,
    VllmBlockStored,
    VllmEventBatch,
    ZmqEventPublisher,
    encode_batch,
)
from tests.event_harness import ScriptedReplay
from tests.index_impl import RECEIVE_IMPL, new_index
from tests.polling import eventually

MODEL = "m"
BS = 4
SOURCE = source_id("e", 0)


def _stored(h: int, first_token: int) -> VllmBlockStored:
    return VllmBlockStored([h], None, [first_token + i for i in range(BS)], BS)


def _payload(*events: VllmBlockStored | VllmAllBlocksCleared) -> bytes:
    return encode_batch(VllmEventBatch(1.0, list(events), 0))


class Rig:
    def __init__(self, context: zmq.asyncio.Context, *, tail_check_s: float = 0.0) -> None:
        self.counters = EventCounters()
        self.index = new_index(counters=self.counters)
        self.manager = SubscriberManager(
            self.index,
            self.counters,
            context=context,
            replay_timeout_s=0.3,
            max_concurrent_replays=4,
            retry_backoff_s=(0.05, 0.2),
            tail_check_s=tail_check_s,
            receive_impl=RECEIVE_IMPL,
        )

    def last_seq(self) -> int | None:
        return self.manager.status()[0].last_seq

    def stale(self) -> bool:
        return self.manager.status()[0].stale

    def holds(self, first_token: int) -> bool:
        prompt = [first_token + i for i in range(BS)]
        return "e" in self.index.match(MODEL, None, prompt)

    async def settle(self, pub: ZmqEventPublisher, first_token: int) -> int:
        """Publish until a live batch arrives (the subscription reached the PUB)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            seq = pub.publish_payload(_payload(_stored(10_000 + pub.next_seq, first_token)))
            with contextlib.suppress(AssertionError):
                await eventually(
                    lambda seq=seq: self.last_seq() == seq,  # type: ignore[misc]
                    "live batch",
                    timeout_s=0.3,
                )
                return seq
            assert loop.time() < deadline, "no live batch ever arrived"


@contextlib.asynccontextmanager
async def running(
    ctx: zmq.asyncio.Context, rig: Rig, *, scripted: bool
) -> AsyncIterator[tuple[ZmqEventPublisher, ScriptedReplay]]:
    """A publisher, and a scripted replay server standing in for its own when `scripted`; the
    rig subscribed and settled on the live stream."""
    replay = ScriptedReplay(ctx)
    pub = ZmqEventPublisher(
        "tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", topic="kv", context=ctx
    )
    await pub.start()
    spec = SourceSpec(
        engine="e",
        model=MODEL,
        endpoint=pub.endpoint,
        replay_endpoint=replay.endpoint if scripted else pub.replay_endpoint,
        topic="kv",
    )
    try:
        await rig.manager.add_source(spec)
        await rig.settle(pub, first_token=1)
        yield pub, replay
    finally:
        await asyncio.wait_for(rig.manager.close(), 5)
        await pub.close()
        await replay.close()


async def test_an_unfinished_retry_replay_holding_a_clear_leaves_no_false_hold(
    ctx: zmq.asyncio.Context,
) -> None:
    rig = Rig(ctx)
    async with running(ctx, rig, scripted=True) as (pub, replay):
        base = rig.last_seq() or 0
        replay.silent = True  # the gap replay times out: stale
        pub.drop_next(1)
        lost = pub.publish_payload(_payload(_stored(1, 100)))
        pub.publish_payload(_payload(_stored(2, 200)))
        await eventually(rig.stale, "stale after an unclosable gap")
        # The retry returns the missing batches and a clear with a new store, then no end
        # marker: what was published meanwhile may still be missing.
        replay.batches = [
            (lost, _payload(_stored(1, 100))),
            (lost + 1, _payload(_stored(2, 200))),
            (lost + 2, _payload(VllmAllBlocksCleared(), _stored(3, 300))),
        ]
        replay.silent = False
        replay.no_end = True
        await eventually(lambda: rig.last_seq() == lost + 2, "the retry's batches applied")
        assert base < lost
        assert rig.stale()
        assert rig.index.is_stale(SOURCE)
        assert not rig.holds(300), "a stale source's block counted for routing"


async def test_a_lost_final_batch_is_repaired_once_the_source_is_quiet(
    ctx: zmq.asyncio.Context,
) -> None:
    rig = Rig(ctx, tail_check_s=0.2)
    async with running(ctx, rig, scripted=False) as (pub, _replay):
        assert rig.holds(1)
        pub.drop_next(1)
        pub.publish_payload(_payload(VllmAllBlocksCleared()))  # lost; nothing follows
        await eventually(lambda: not rig.holds(1), "the evicted block is no longer claimed")
        assert rig.counters.seq_gaps[SOURCE] == 1


async def test_live_backlog_older_than_a_resync_bootstrap_is_not_a_restart(
    ctx: zmq.asyncio.Context,
) -> None:
    rig = Rig(ctx)
    async with running(ctx, rig, scripted=True) as (pub, replay):
        # Hold the resync's bootstrap answer until live batches have queued on the SUB socket.
        replay.bootstrap_gate = asyncio.Event()
        # A gap whose replay shows the buffer moved on: stale, then a resync on retry.
        replay.batches = [(pub.next_seq + 1_000, _payload(_stored(7, 700)))]
        pub.drop_next(3)
        for h in range(3):
            pub.publish_payload(_payload(_stored(20 + h, 2_000 + 10 * h)))
        pub.publish_payload(_payload(_stored(30, 3_000)))
        requests = len(replay.starts)
        await eventually(lambda: 0 in replay.starts[requests:], "the resync's bootstrap request")
        for h in range(20):
            pub.publish_payload(_payload(_stored(40 + h, 4_000 + 10 * h)))
        # The bootstrap window lies beyond the backlog (the buffer kept newer batches only).
        window = pub.next_seq + 100
        replay.batches = [(window + i, _payload(_stored(90 + i, 9_000 + 10 * i))) for i in range(5)]
        replay.bootstrap_gate.set()
        await eventually(lambda: rig.last_seq() == window + 4, "the bootstrap window applied")
        # Every queued batch is older than the window: each is a duplicate, none a restart.
        await eventually(
            lambda: rig.counters.dropped[(SOURCE, "duplicate")] >= 20,
            f"the backlog counted as duplicates (resets: {dict(rig.counters.resets)})",
        )
        assert rig.counters.resets[(SOURCE, ResetCause.SEQ_BACKWARDS.value)] == 0
        assert rig.last_seq() == window + 4
        assert rig.holds(9_000 + 10 * 4)
