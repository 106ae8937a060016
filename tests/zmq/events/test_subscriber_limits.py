"""Ingest budgets and the message size limit over real sockets: a flooding source goes stale
(never partial) and catches up by replay once it is back under budget, beside an honest source
that never notices; a message over the size limit is never taken."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import zmq.asyncio

from kvroute.core import IngestLimits
from kvroute.events import VllmAllBlocksCleared, VllmBlockStored, VllmEventBatch
from tests.event_harness import MODEL, Stack, feeding, holdings, make_stack, until
from tests.event_streams import BLOCK_SIZE

DEADLINE_S = 30.0


@pytest.fixture
async def limited(ctx: zmq.asyncio.Context) -> AsyncIterator[Stack]:
    # 300 events per second per source, 150 saved up: a flood of 1,500 events is 5 s of budget.
    limits = IngestLimits(source_events_per_s=300.0, burst_s=0.5)
    stack = make_stack(ctx, retry_backoff_s=(0.05, 0.2), ingest_limits=limits)
    try:
        yield stack
    finally:
        await stack.manager.close()


async def test_a_flood_makes_its_source_stale_until_a_replay_catches_it_up(
    ctx: zmq.asyncio.Context, limited: Stack
) -> None:
    stack = limited
    async with feeding(ctx, "honest", seed=1) as honest, feeding(ctx, "flood", seed=2) as flood:
        await honest.attach(stack)
        await flood.attach(stack)
        flood.publish(500, events=3)  # 1,500 events at once
        assert await until(
            lambda: (
                stack.sample(
                    "kvroute_events_dropped_total", source=flood.source, reason="over_budget"
                )
                > 0
            ),
            DEADLINE_S,
        ), "the flood was never refused"
        # While the flood is refused, its source is stale: none of its blocks count, so the
        # index is exact or stale, never silently partial.
        status = stack.status(flood.source)
        assert status.stale, status
        assert status.stale_reason in ("over_budget", "replay_over_budget"), status
        assert flood.engine in stack.index.stale_engines()
        # The honest source, publishing meanwhile, is applied at once and exactly.
        seq = honest.publish(5)
        assert await stack.applied(honest.source, seq)
        assert not stack.status(honest.source).stale
        assert holdings(stack, honest.source) == honest.reference()
        # The flood ends; replays from the flood's last seq catch it up within its budget.
        assert await until(
            lambda: (
                not stack.status(flood.source).stale
                and holdings(stack, flood.source) == flood.reference()
            ),
            DEADLINE_S,
        ), f"never caught up: {stack.status(flood.source)}"
        over = stack.sample("kvroute_replays_total", source=flood.source, outcome="over_budget")
        assert over >= 1  # the catch-up took several replays, each as far as the budget went


async def test_a_message_over_the_size_limit_is_never_taken(ctx: zmq.asyncio.Context) -> None:
    stack = make_stack(ctx, retry_backoff_s=(0.05, 0.2), max_message_bytes=64 * 1024)
    try:
        async with feeding(ctx, "big", seed=3) as feed:
            await feed.attach(stack)
            blocks = 8_000  # 128,000 token ids: far over 64 KiB
            huge = VllmBlockStored(
                block_hashes=list(range(10**9, 10**9 + blocks)),
                parent_block_hash=None,
                token_ids=[7] * (blocks * BLOCK_SIZE),
                block_size=BLOCK_SIZE,
                medium="GPU",
            )
            feed.publish_batch(VllmEventBatch(1.0, [huge], 0))
            # libzmq refuses it before allocating and closes the connection; the subscriber
            # connects afresh (libzmq would not, after a protocol error) and follows again.
            assert await until(
                lambda: (
                    stack.sample(
                        "kvroute_source_resets_total", source=feed.source, cause="disconnect"
                    )
                    >= 1
                ),
                DEADLINE_S,
            ), "the oversized message did not end the connection"
            # The batch it never took is a gap no replay can close (the replay refuses it too):
            # the source is stale, never holding a block it was not shown.
            assert await until(
                lambda: feed.publish() >= 0 and stack.status(feed.source).stale, DEADLINE_S
            ), stack.status(feed.source)
            assert stack.status(feed.source).connected
            assert feed.engine in stack.index.stale_engines()  # nothing of it is routed on
            assert stack.index.match(MODEL, None, huge.token_ids[: 4 * BLOCK_SIZE]) == {}
            # The engine drops its cache (or restarts): a fresh base, exact again.
            feed.publish_batch(VllmEventBatch(1.0, [VllmAllBlocksCleared()], 0))
            seq = feed.publish(3)
            assert await stack.applied(feed.source, seq), stack.status(feed.source)
            assert not stack.status(feed.source).stale
            assert holdings(stack, feed.source) == feed.reference()
    finally:
        await stack.manager.close()


async def test_a_replay_reply_is_read_up_to_its_limit_and_the_rest_asked_for_again(
    ctx: zmq.asyncio.Context,
) -> None:
    stack = make_stack(ctx, retry_backoff_s=(0.05, 0.2), max_replay=(10, 0))
    try:
        async with feeding(ctx, "late", seed=4) as feed:
            await feed.attach(stack, backlog=45)  # the bootstrap alone would read 45 batches
            assert await until(
                lambda: holdings(stack, feed.source) == feed.reference(), DEADLINE_S
            ), stack.status(feed.source)
            assert not stack.status(feed.source).stale
            cut = stack.sample("kvroute_replays_total", source=feed.source, outcome="truncated")
            assert cut >= 4  # 45 batches, 10 at a time
    finally:
        await stack.manager.close()
