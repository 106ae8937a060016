"""Fault injection against the subscriber: loss, bursts, pauses, restarts, garbage, overflow.
Once the faults stop, every source must hold exactly what its engine holds and not be stale."""

from __future__ import annotations

import asyncio
import random

import pytest
import zmq.asyncio

from tests.event_harness import Feed, Stack, holdings, make_stack, start_feed, until


async def _converged(stack: Stack, feeds: list[Feed]) -> None:
    finals = {}
    for feed in feeds:
        if feed.paused:
            feed.resume()
        finals[feed.source] = feed.publish(1)
    for feed in feeds:
        ok = await until(
            lambda f=feed: (
                stack.status(f.source).last_seq == finals[f.source]
                and not stack.status(f.source).stale
                and holdings(stack, f.source) == f.reference()
            ),
            timeout_s=15,
        )
        status = stack.status(feed.source)
        assert ok, f"{feed.source} did not converge: {status}"


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_faults_converge_to_the_engines_truth(
    ctx: zmq.asyncio.Context, seed: int
) -> None:
    rng = random.Random(seed)
    stack = make_stack(ctx, replay_timeout_s=1.0, retry_backoff_s=(0.02, 0.2))
    releases = ["0.33.0", "0.22.0", "0.26.0"]
    feeds = [
        await start_feed(ctx, f"engine-{i}", release=releases[i], seed=seed * 10 + i)
        for i in range(3)
    ]
    try:
        for feed in feeds:
            feed.publish(rng.randint(0, 5))
            await stack.manager.add_source(feed.spec())
        restarts = 0
        for step in range(80):
            feed = rng.choice(feeds)
            fault = rng.random()
            if fault < 0.2:
                feed.pub.drop_next(rng.randint(1, 4))
            elif fault < 0.3 and not feed.paused:
                feed.pause()
            elif fault < 0.4 and feed.paused:
                feed.resume()
            elif fault < 0.43 and restarts < 2 and not feed.paused:
                restarts += 1
                await feed.restart(seed=seed * 100 + step)
            elif fault < 0.47 and not feed.paused:
                # Garbage, then the engine clears its cache: stale in between, consistent after.
                feed.pub.publish_payload(b"\x92\xcb garbage")
                feed.published = []
                feed.publish_batch(feed.stream.clear())
            feed.publish(rng.randint(1, 6), events=rng.randint(1, 10))
            if rng.random() < 0.3:
                await asyncio.sleep(0)  # let the subscribers interleave with the publishers
        await _converged(stack, feeds)
        assert sum(stack.sample("kvroute_seq_gaps_total", source=f.source) for f in feeds) > 0
    finally:
        await stack.manager.close()
        for feed in feeds:
            await feed.pub.close()


async def test_burst_beyond_the_publisher_hwm_converges(ctx: zmq.asyncio.Context) -> None:
    stack = make_stack(ctx, retry_backoff_s=(0.02, 0.2))
    # A tiny PUB high-water mark: a burst overflows it and replay has to cover the losses.
    feed = await start_feed(ctx, "bursty", seed=4, hwm=16)
    try:
        await feed.attach(stack)
        feed.publish(3000, events=2)
        await _converged(stack, [feed])
    finally:
        await stack.manager.close()
        await feed.pub.close()


async def test_many_sources_with_one_replay_slot_all_bootstrap(ctx: zmq.asyncio.Context) -> None:
    stack = make_stack(ctx, max_concurrent_replays=1)
    feeds = [await start_feed(ctx, f"engine-{i}", seed=20 + i) for i in range(8)]
    try:
        for feed in feeds:
            feed.publish(30)
        for feed in feeds:
            await stack.manager.add_source(feed.spec())
        await _converged(stack, feeds)
    finally:
        await stack.manager.close()
        for feed in feeds:
            await feed.pub.close()
