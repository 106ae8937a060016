"""SubscriberManager over real ZeroMQ sockets: bootstrap, gaps, restarts, staleness, DP ranks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import zmq.asyncio

from kvroute.core import EventCounters, SourceSpec, source_id
from kvroute.errors import ConfigError
from kvroute.events import SubscriberManager, decode_batch, encode_batch
from tests.event_harness import (
    MODEL,
    RELEASES,
    ScriptedReplay,
    Stack,
    feeding,
    free_port_pair,
    holdings,
    make_stack,
    start_feed,
    until,
)
from tests.event_streams import BLOCK_SIZE, EngineStream
from tests.index_impl import new_index


@pytest.fixture
async def stack(ctx: zmq.asyncio.Context) -> AsyncIterator[Stack]:
    s = make_stack(ctx)
    yield s
    await asyncio.wait_for(s.manager.close(), 5)


@pytest.mark.parametrize("release", RELEASES)
async def test_late_join_bootstraps_by_replay(
    ctx: zmq.asyncio.Context, stack: Stack, release: str
) -> None:
    async with feeding(ctx, release=release) as feed:
        last = feed.publish(20)
        await stack.manager.add_source(feed.spec())
        assert await stack.applied(feed.source, last)
        assert holdings(stack, feed.source) == feed.reference()
        assert holdings(stack, feed.source)  # the stream really stored something
        assert stack.sample("kvroute_replays_total", source=feed.source, outcome="ok") >= 1
        status = stack.status(feed.source)
        assert (status.last_seq, status.stale, status.engine, status.rank) == (
            last,
            False,
            "engine-a",
            0,
        )
        assert status.blocks == stack.index.source_block_count(feed.source)
        assert stack.sample("kvroute_source_last_seq", source=feed.source) == last


@pytest.mark.parametrize("release", RELEASES)
async def test_dropped_batches_are_recovered_by_replay(
    ctx: zmq.asyncio.Context, stack: Stack, release: str
) -> None:
    async with feeding(ctx, release=release) as feed:
        await feed.attach(stack, backlog=5)
        dup_before = stack.sample(
            "kvroute_events_dropped_total", source=feed.source, reason="duplicate"
        )
        feed.pub.drop_next(3)
        feed.publish(3)  # buffered for replay, never sent live
        last = feed.publish(4)  # the first of these reveals the gap
        assert await stack.applied(feed.source, last)
        assert holdings(stack, feed.source) == feed.reference()
        assert stack.sample("kvroute_seq_gaps_total", source=feed.source) == 1
        # The replay included the live batch that revealed the gap: that one is a duplicate.
        dup = stack.sample("kvroute_events_dropped_total", source=feed.source, reason="duplicate")
        assert dup >= dup_before + 1
        assert not stack.status(feed.source).stale
        assert not stack.index.is_stale(feed.source)


async def test_publisher_restart_resets_only_that_source(
    ctx: zmq.asyncio.Context, stack: Stack
) -> None:
    async with (
        feeding(ctx, "engine-a", seed=1) as a,
        feeding(ctx, "engine-b", seed=2) as b,
    ):
        for feed in (a, b):
            await feed.attach(stack, backlog=10)
        b_before = holdings(stack, b.source)
        assert b_before == b.reference()
        old_a = holdings(stack, a.source)

        await a.restart(seed=3)
        a.publish(6)
        assert await until(
            lambda: (
                holdings(stack, a.source) == a.reference() and stack.status(a.source).last_seq == 5
            )
        )
        assert not old_a & holdings(stack, a.source)
        resets = sum(
            stack.sample("kvroute_source_resets_total", source=a.source, cause=cause)
            for cause in ("disconnect", "seq_backwards")
        )
        assert resets >= 1
        assert holdings(stack, b.source) == b_before
        for cause in ("disconnect", "seq_backwards", "resync"):
            assert stack.sample("kvroute_source_resets_total", source=b.source, cause=cause) == 0
        last_b = b.publish(2)
        assert await stack.applied(b.source, last_b)
        assert holdings(stack, b.source) == b.reference()


async def test_dead_replay_endpoint_makes_gap_stale_until_engine_restarts(
    ctx: zmq.asyncio.Context,
) -> None:
    stack = make_stack(ctx, replay_timeout_s=0.3, retry_backoff_s=(0.05, 0.2))
    feed = await start_feed(ctx)
    try:
        await feed.attach(stack)
        await feed.pub.stop_replay()
        feed.pub.drop_next(1)
        feed.publish(1)
        feed.publish(1)  # reveals the gap; replay cannot answer
        assert await until(lambda: stack.status(feed.source).stale)
        assert stack.status(feed.source).stale_reason == "replay_timeout"
        assert stack.index.is_stale(feed.source)
        assert stack.sample("kvroute_source_stale", source=feed.source) == 1
        assert stack.sample("kvroute_seq_gaps_total", source=feed.source) == 1
        held_back = stack.sample(
            "kvroute_events_dropped_total", source=feed.source, reason="stale_source"
        )
        assert held_back >= 1
        # Retried with backoff, still failing: stays stale.
        assert await until(
            lambda: (
                stack.sample("kvroute_replays_total", source=feed.source, outcome="timeout") >= 3
            )
        )
        assert stack.status(feed.source).stale

        await feed.restart(seed=7)
        await feed.pub.start_replay()
        last = feed.publish(3)
        assert await until(
            lambda: (
                not stack.status(feed.source).stale and stack.status(feed.source).last_seq == last
            )
        )
        assert holdings(stack, feed.source) == feed.reference()
        assert not stack.index.is_stale(feed.source)
        assert stack.sample("kvroute_source_stale", source=feed.source) == 0
        assert stack.sample("kvroute_source_stale_seconds_total", source=feed.source) > 0
    finally:
        await stack.manager.close()
        await feed.pub.close()


async def test_stale_gap_recovers_when_replay_comes_back(ctx: zmq.asyncio.Context) -> None:
    stack = make_stack(ctx, replay_timeout_s=0.3, retry_backoff_s=(0.05, 0.2))
    feed = await start_feed(ctx)
    try:
        await feed.attach(stack)
        await feed.pub.stop_replay()
        feed.pub.drop_next(2)
        feed.publish(4)
        assert await until(lambda: stack.status(feed.source).stale)
        await feed.pub.start_replay()
        last = feed.publish(2)
        assert await until(
            lambda: (
                not stack.status(feed.source).stale and stack.status(feed.source).last_seq == last
            )
        )
        assert holdings(stack, feed.source) == feed.reference()
        assert stack.sample("kvroute_source_resets_total", source=feed.source, cause="resync") == 0
    finally:
        await stack.manager.close()
        await feed.pub.close()


async def test_gap_past_the_replay_buffer_resyncs_as_late_joiner(
    ctx: zmq.asyncio.Context,
) -> None:
    stack = make_stack(ctx, retry_backoff_s=(0.05, 0.2))
    feed = await start_feed(ctx, buffer_steps=3)
    try:
        await feed.attach(stack)
        feed.pub.drop_next(6)
        feed.publish(6)  # the buffer keeps only the newest 3
        last = feed.publish(1)
        assert await until(
            lambda: (
                stack.sample("kvroute_source_resets_total", source=feed.source, cause="resync") == 1
            )
        )
        assert stack.sample("kvroute_replays_total", source=feed.source, outcome="partial") >= 1
        assert await until(lambda: not stack.status(feed.source).stale)
        assert await stack.applied(feed.source, last)
        # A late joiner holds a subset of the truth, never a block the engine does not hold.
        assert holdings(stack, feed.source) <= feed.reference()
        last = feed.publish(3)
        assert await stack.applied(feed.source, last)
        assert not stack.status(feed.source).stale
    finally:
        await stack.manager.close()
        await feed.pub.close()


async def test_malformed_payload_is_counted_and_stale_until_all_blocks_cleared(
    ctx: zmq.asyncio.Context, stack: Stack
) -> None:
    async with feeding(ctx) as feed:
        await feed.attach(stack)
        bad = feed.pub.publish_payload(b"\xc1 not msgpack")
        assert await stack.applied(feed.source, bad)  # the seq is consumed
        assert (
            stack.sample("kvroute_events_dropped_total", source=feed.source, reason="malformed")
            == 1
        )
        status = stack.status(feed.source)
        assert (status.stale, status.stale_reason) == (True, "malformed")
        assert stack.index.is_stale(feed.source)
        last = feed.publish(2)
        assert await stack.applied(feed.source, last)
        assert stack.status(feed.source).stale  # live batches flow, the source stays stale

        feed.published = []
        feed.publish_batch(feed.stream.clear())
        last = feed.publish(2)
        assert await stack.applied(feed.source, last)
        assert not stack.status(feed.source).stale
        assert not stack.index.is_stale(feed.source)
        assert holdings(stack, feed.source) == feed.reference()
        assert (
            stack.sample(
                "kvroute_source_resets_total", source=feed.source, cause="all_blocks_cleared"
            )
            == 1
        )


async def test_dp_ranks_on_offset_ports_are_separate_sources_of_one_engine(
    ctx: zmq.asyncio.Context, stack: Stack
) -> None:
    port, replay_port = free_port_pair(), free_port_pair()
    ranks = [
        await start_feed(
            ctx,
            "engine-dp",
            rank=rank,
            seed=10 + rank,
            endpoint=f"tcp://127.0.0.1:{port + rank}",
            replay_endpoint=f"tcp://127.0.0.1:{replay_port + rank}",
        )
        for rank in (0, 1)
    ]
    try:
        for feed in ranks:
            await feed.attach(stack, backlog=8)
        r0, r1 = ranks
        assert r1.pub.endpoint == f"tcp://127.0.0.1:{port + 1}"
        assert holdings(stack, r0.source) == r0.reference()
        assert holdings(stack, r1.source) == r1.reference()
        assert {s.rank for s in stack.manager.status()} == {0, 1}
        assert {s.engine for s in stack.manager.status()} == {"engine-dp"}

        # A batch claiming rank 0 on rank 1's socket belongs to rank 1's source, counted.
        wrong = EngineStream(99, rank=0, hash_base=99_000_000).batch()
        last = r1.publish_batch(wrong)
        assert await stack.applied(r1.source, last)
        assert holdings(stack, r1.source) == r1.reference()
        assert holdings(stack, r0.source) == r0.reference()
        assert stack.sample("kvroute_rank_mismatches_total", source=r1.source) == 1
        assert stack.sample("kvroute_rank_mismatches_total", source=r0.source) == 0

        # Both ranks answer for the one engine.
        root = next(
            e
            for b in r1.published
            for e in b.events
            if getattr(e, "parent_block_hash", 0) is None and e.token_ids
        )
        match = stack.index.match(MODEL, None, root.token_ids[:BLOCK_SIZE])  # type: ignore[union-attr]
        assert match["engine-dp"].blocks == 1
    finally:
        for feed in ranks:
            await feed.pub.close()


async def test_raw_frames_seq_backwards_and_disconnect(ctx: zmq.asyncio.Context) -> None:
    """A bare PUB socket (no replay): bad frames, seq going backwards, the engine going away."""
    stack = make_stack(ctx, retry_backoff_s=(0.05, 0.2))
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    source = source_id("raw", 0)
    stream = EngineStream(5)

    async def send(seq: int) -> None:
        payload = encode_batch(stream.batch(), "0.33.0")
        await pub.send_multipart([b"kv", seq.to_bytes(8, "big"), payload])

    try:
        await stack.manager.add_source(
            SourceSpec(engine="raw", model=MODEL, endpoint=endpoint, topic="kv")
        )
        seq = 0
        while True:  # slow joiner, no replay: publish until seen
            await send(seq)
            if await stack.applied(source, seq, timeout_s=0.2):
                break
            seq += 1
        base = seq
        await pub.send_multipart([b"kv", b"\x00\x01", b"payload"])  # seq not 8 bytes
        await pub.send_multipart([b"kv", (seq + 1).to_bytes(8, "big")])  # two frames
        await send(seq + 1)
        assert await stack.applied(source, seq + 1)
        assert stack.sample("kvroute_events_dropped_total", source=source, reason="malformed") == 2
        assert not stack.status(source).stale

        # A gap with no replay endpoint: stale, then resync takes the next batch as a new base.
        await send(seq + 3)
        assert await until(
            lambda: stack.sample("kvroute_replays_total", source=source, outcome="no_endpoint") >= 1
        )
        seq += 3
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            seq += 1
            await send(seq)
            if await until(
                lambda s=seq: not stack.status(source).stale and stack.status(source).last_seq == s,
                0.3,
            ):
                break
            assert loop.time() < deadline, "never resynced"
        assert stack.sample("kvroute_source_resets_total", source=source, cause="resync") == 1

        await send(base)  # backwards: the engine restarted
        assert await until(lambda: stack.status(source).last_seq == base)
        assert (
            stack.sample("kvroute_source_resets_total", source=source, cause="seq_backwards") == 1
        )

        pub.close(linger=0)
        assert await until(
            lambda: (
                stack.sample("kvroute_source_resets_total", source=source, cause="disconnect") == 1
            )
        )
        status = stack.status(source)
        assert (status.connected, status.last_seq, status.blocks) == (False, None, 0)
    finally:
        pub.close(linger=0)
        await stack.manager.close()


async def test_remove_source_forgets_it_and_others_keep_running(
    ctx: zmq.asyncio.Context, stack: Stack
) -> None:
    async with (
        feeding(ctx, "engine-a", seed=1) as a,
        feeding(ctx, "engine-b", seed=2) as b,
    ):
        for feed in (a, b):
            await feed.attach(stack, backlog=4)
        await stack.manager.remove_source(a.source)
        assert [s.source for s in stack.manager.status()] == [b.source]
        assert stack.index.source_block_count(a.source) == 0
        assert stack.sample("kvroute_source_resets_total", source=a.source, cause="removed") == 1
        last = b.publish(3)
        assert await stack.applied(b.source, last)
        assert holdings(stack, b.source) == b.reference()
        await stack.manager.remove_source(a.source)  # unknown now: no-op


async def test_close_never_hangs_on_unreachable_sources() -> None:
    context = zmq.asyncio.Context()
    stack = make_stack(context, replay_timeout_s=5.0)
    own = SubscriberManager(  # owns its context
        stack.index,
        EventCounters(),
        replay_timeout_s=5.0,
        max_concurrent_replays=4,
        retry_backoff_s=(0.05, 0.4),
        tail_check_s=0.0,
    )
    for manager in (stack.manager, own):
        for rank in (0, 1):
            port = free_port_pair()
            await manager.add_source(
                SourceSpec(
                    engine="ghost",
                    model=MODEL,
                    endpoint=f"tcp://127.0.0.1:{port}",
                    replay_endpoint=f"tcp://127.0.0.1:{port + 1}",
                    rank=rank,
                )
            )
    assert {s.source for s in own.status()} == {source_id("ghost", 0), source_id("ghost", 1)}
    await asyncio.sleep(0)  # let the tasks start
    await asyncio.wait_for(own.close(), 2)
    await asyncio.wait_for(stack.manager.close(), 2)
    context.destroy(linger=0)
    with pytest.raises(RuntimeError):
        await own.add_source(SourceSpec(engine="x", model=MODEL, endpoint="tcp://x:1"))


def test_max_concurrent_replays_below_one_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max_concurrent_replays: expected >= 1, got 0"):
        SubscriberManager(
            new_index(),
            EventCounters(),
            replay_timeout_s=1.0,
            max_concurrent_replays=0,
            retry_backoff_s=(0.05, 0.4),
            tail_check_s=0.0,
        )


async def test_restart_right_after_bootstrap_is_told_from_replay_overlap_by_its_bytes(
    ctx: zmq.asyncio.Context, stack: Stack
) -> None:
    """Seqs 0..4 were bootstrapped by replay and no live batch came yet: a live seq <= 4 is
    overlap only if its bytes are the replayed ones; a new engine process reusing the seqs
    (its disconnect not seen yet) must reset the source, not be dropped as a duplicate."""
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    replay = ScriptedReplay(ctx)
    source = source_id("scripted", 0)
    old, new = EngineStream(1, hash_base=1_000), EngineStream(2, hash_base=2_000_000)
    old_payloads = [encode_batch(b, "0.33.0") for b in old.batches(5)]
    new_batches = new.batches(5)
    new_payloads = [encode_batch(b, "0.33.0") for b in new_batches]
    try:
        replay.batches = list(enumerate(old_payloads))
        await stack.manager.add_source(
            SourceSpec(
                engine="scripted",
                model=MODEL,
                endpoint=pub.getsockopt_string(zmq.LAST_ENDPOINT),
                replay_endpoint=replay.endpoint,
                topic="kv",
            )
        )
        assert await stack.applied(source, 4)
        assert await until(lambda: stack.status(source).connected)
        replay.batches = list(enumerate(new_payloads))  # the engine restarted
        for seq, payload in enumerate(new_payloads):
            await pub.send_multipart([b"kv", seq.to_bytes(8, "big"), payload])
        reference = make_stack(ctx).index
        reference.add_source(source, engine="scripted", model=MODEL)
        for batch in new_batches:
            reference.apply(source, decode_batch(encode_batch(batch, "0.33.0")))
        want = {(int(h), m) for h, m in reference.holdings(source)}
        assert await until(lambda: holdings(stack, source) == want)
        assert (
            stack.sample("kvroute_source_resets_total", source=source, cause="seq_backwards") >= 1
        )
    finally:
        pub.close(linger=0)
        await replay.close()


async def test_unreadable_replay_reply_counts_error_and_live_takes_over(
    ctx: zmq.asyncio.Context, stack: Stack
) -> None:
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    replay = ScriptedReplay(ctx)
    replay.garbage = True
    source = source_id("garbled", 0)
    stream = EngineStream(3)
    try:
        await stack.manager.add_source(
            SourceSpec(
                engine="garbled",
                model=MODEL,
                endpoint=pub.getsockopt_string(zmq.LAST_ENDPOINT),
                replay_endpoint=replay.endpoint,
                topic="kv",
            )
        )
        assert await until(
            lambda: stack.sample("kvroute_replays_total", source=source, outcome="error") >= 1
        )
        seq = 0
        while True:  # the bootstrap failed: the first live batch seen becomes the base
            await pub.send_multipart(
                [b"kv", seq.to_bytes(8, "big"), encode_batch(stream.batch(), "0.33.0")]
            )
            if await stack.applied(source, seq, timeout_s=0.3):
                break
            seq += 1
        status = stack.status(source)
        assert (status.stale, status.last_seq) == (False, seq)
        assert status.blocks > 0
    finally:
        pub.close(linger=0)
        await replay.close()


async def test_a_source_waiting_on_replay_does_not_block_the_others(
    ctx: zmq.asyncio.Context,
) -> None:
    stack = make_stack(ctx, replay_timeout_s=5.0)
    a = await start_feed(ctx, "engine-a", seed=1)
    b = await start_feed(ctx, "engine-b", seed=2)
    try:
        for feed in (a, b):
            await feed.attach(stack)
        await a.pub.stop_replay()
        a.pub.drop_next(1)
        a.publish(2)  # engine-a now waits up to 5 s for a replay that never answers
        loop = asyncio.get_running_loop()
        started = loop.time()
        last = b.publish(5)
        assert await stack.applied(b.source, last, timeout_s=4.0)
        assert loop.time() - started < 4.0
        assert holdings(stack, b.source) == b.reference()
        assert not stack.status(a.source).stale  # still inside its replay deadline
    finally:
        await asyncio.wait_for(stack.manager.close(), 5)
        await a.pub.close()
        await b.pub.close()


async def test_malformed_endpoint_is_a_config_error(stack: Stack) -> None:
    spec = SourceSpec(engine="bad", model=MODEL, endpoint="nonsense")
    with pytest.raises(ConfigError, match="nonsense"):
        await stack.manager.add_source(spec)
    assert stack.manager.status() == []
