"""The subscriber's receive loop over real sockets: frame by frame receives that never lose the
message boundary, and descriptor wake-ups that do not spin while a replay is outstanding."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
import zmq.asyncio

from kvroute.core import SourceSpec, source_id
from kvroute.events import encode_batch, subscriber
from tests.event_harness import MODEL, ScriptedReplay, Stack, make_stack, until
from tests.event_streams import EngineStream


async def test_messages_of_every_wrong_frame_count_are_counted_and_skipped_whole(
    ctx: zmq.asyncio.Context,
) -> None:
    stack = make_stack(ctx)
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    source = source_id("frames", 0)
    stream = EngineStream(11)

    def message(seq: int) -> list[bytes]:
        return [b"kv", seq.to_bytes(8, "big"), encode_batch(stream.batch(), "0.33.0")]

    try:
        await stack.manager.add_source(
            SourceSpec(engine="frames", model=MODEL, endpoint=endpoint, topic="kv")
        )
        seq = 0
        while True:  # slow joiner, no replay: publish until seen
            await pub.send_multipart(message(seq))
            if await stack.applied(source, seq, timeout_s=0.2):
                break
            seq += 1
        good = message(seq + 1)
        bad = [
            [b"kv"],  # one frame
            [b"kv", (seq + 1).to_bytes(8, "big")],  # two frames
            [*good, b"extra"],  # four frames: its parts must not start the next message
            [*good, b"extra", b"more", b"and more"],  # six frames
            [b"kv", b"\x00" * 7, good[2]],  # a 7-byte seq
        ]
        for frames in bad:
            await pub.send_multipart(frames)
        await pub.send_multipart(good)
        await pub.send_multipart(message(seq + 2))
        assert await stack.applied(source, seq + 2)
        assert stack.sample(
            "kvroute_events_dropped_total", source=source, reason="malformed"
        ) == len(bad)
        status = stack.status(source)
        assert not status.stale and status.last_seq == seq + 2
        assert stack.sample("kvroute_seq_gaps_total", source=source) == 0
    finally:
        pub.close(linger=0)
        await stack.manager.close()


async def test_a_source_waiting_on_its_replay_does_not_spin_the_loop(
    ctx: zmq.asyncio.Context,
) -> None:
    """While a source waits for a replay, its SUB socket's descriptor may turn readable (the
    connection's pipe, live messages); nobody drains it until the replay ends, so the loop must
    not call back on it over and over meanwhile."""
    stack = make_stack(ctx, replay_timeout_s=1.0)
    replay = ScriptedReplay(ctx)
    replay.bootstrap_gate = asyncio.Event()  # never opened: the bootstrap times out
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    source = source_id("waiting", 0)
    stream = EngineStream(12)
    try:
        await stack.manager.add_source(
            SourceSpec(
                engine="waiting",
                model=MODEL,
                endpoint=endpoint,
                replay_endpoint=replay.endpoint,
                topic="kv",
            )
        )
        assert await until(lambda: replay.starts == [0])  # the bootstrap is outstanding
        loop = asyncio.get_running_loop()
        cpu0, wall0 = time.thread_time(), loop.time()
        for seq in range(20):
            payload = encode_batch(stream.batch(), "0.33.0")
            await pub.send_multipart([b"kv", seq.to_bytes(8, "big"), payload])
        assert await until(
            lambda: stack.sample("kvroute_replays_total", source=source, outcome="timeout") >= 1
        )
        cpu, wall = time.thread_time() - cpu0, loop.time() - wall0
        # A spinning loop burns most of the wait; a waiting one a few milliseconds.
        assert wall >= 0.5
        assert cpu < 0.3 * wall, (cpu, wall)
        # Afterwards the live stream is taken as it comes (the bootstrap found nothing).
        seq = 20
        while True:
            payload = encode_batch(stream.batch(), "0.33.0")
            await pub.send_multipart([b"kv", seq.to_bytes(8, "big"), payload])
            if await stack.applied(source, seq, timeout_s=0.2):
                break
            seq += 1
    finally:
        pub.close(linger=0)
        await stack.manager.close()
        await replay.close()


@contextlib.asynccontextmanager
async def _coalescing_source(
    ctx: zmq.asyncio.Context, name: str, window: float
) -> AsyncIterator[tuple[Stack, zmq.asyncio.Socket, str, EngineStream, int]]:
    """A stack that coalesces wake-ups `window` apart and a publisher it has subscribed to:
    (stack, pub, source, stream, seq of the first message taken)."""
    stack = make_stack(ctx, coalesce_s=window)
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    source = source_id(name, 0)
    stream = EngineStream(len(name))
    try:
        await stack.manager.add_source(
            SourceSpec(
                engine=name,
                model=MODEL,
                endpoint=pub.getsockopt_string(zmq.LAST_ENDPOINT),
                topic="kv",
            )
        )
        seq = 0
        while True:  # slow joiner, no replay: publish until seen
            await pub.send_multipart([b"kv", seq.to_bytes(8, "big"), encode_batch(stream.batch())])
            if await stack.applied(source, seq, timeout_s=0.2):
                break
            seq += 1
        yield stack, pub, source, stream, seq
    finally:
        pub.close(linger=0)
        await stack.manager.close()


@pytest.mark.parametrize("timer", ["timerfd", "call_later"])
async def test_a_flooding_source_is_drained_once_per_window_and_loses_nothing(
    ctx: zmq.asyncio.Context, timer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if timer == "call_later":  # where the extension has no timerfd
        monkeypatch.setattr(subscriber, "pause_timer", lambda: None)
    # A wide window, so a loaded machine still publishes many messages per window.
    async with _coalescing_source(ctx, "flood", 0.05) as (stack, pub, source, stream, first):
        task = stack.manager._sources[source]
        pauses0 = task.pauses
        last = first + 2000
        for seq in range(first + 1, last + 1):
            payload = encode_batch(stream.batch())
            await pub.send_multipart([b"kv", seq.to_bytes(8, "big"), payload])
            if seq % 50 == 0:
                # Bursts the subscriber keeps up with, however slow the host: were it slower
                # than the publisher, it would never find the socket empty, and only a drain
                # that empties it can pause (a consumer that is behind has nothing to merge).
                assert await stack.applied(source, seq)
        assert await stack.applied(source, last)
        pauses = task.pauses - pauses0
        status = stack.status(source)
        assert not status.stale and stack.sample("kvroute_seq_gaps_total", source=source) == 0
        # Drained in windows: at least one pause, and never more than one per message.
        assert 0 < pauses < last - first, pauses


async def test_a_calm_source_is_drained_as_each_message_comes(ctx: zmq.asyncio.Context) -> None:
    window = 0.001
    loop = asyncio.get_running_loop()
    async with _coalescing_source(ctx, "calm", window) as (stack, pub, source, stream, first):
        task = stack.manager._sources[source]
        pauses0 = task.pauses
        for seq in range(first + 1, first + 6):
            # Paced well apart from the window (a delay here only spaces them further).
            spaced = loop.time() + 10 * window
            while loop.time() < spaced:
                await asyncio.sleep(window)
            payload = encode_batch(stream.batch())
            await pub.send_multipart([b"kv", seq.to_bytes(8, "big"), payload])
            assert await stack.applied(source, seq)
        assert task.pauses == pauses0
