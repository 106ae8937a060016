"""Real-socket harness for subscriber tests: publishers that remember what they sent, a reference
index built from the same bytes, deadline polling, and metric reads from the registry."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq.asyncio

from kvroute.core import SourceId, SourceSpec, SourceStatus, source_id
from kvroute.events import (
    CurveKeyPair,
    SubscriberManager,
    VllmEventBatch,
    ZmqEventPublisher,
    decode_batch,
    encode_batch,
)
from kvroute.index import PrefixIndex
from kvroute.metrics import Metrics
from kvroute.relay import Relay, RelayConfig
from kvroute.sim.fleet import _consecutive_free_ports
from tests.event_streams import EngineStream
from tests.index_impl import RECEIVE_IMPL, new_index

MODEL = "test/model"
RELEASES = ("0.9.0", "0.22.0", "0.26.0", "0.33.0")


@dataclass
class RelayTransport:
    """While set (`TRANSPORT`), every feed is published through a `kvroute relay` of its own and
    every stack subscribes as a CURVE client: tests/zmq/relay reruns the subscriber scenarios so."""

    server: CurveKeyPair
    client: CurveKeyPair
    allow_dir: Path
    relays: list[Relay] = field(default_factory=list)

    async def front(self, pub: ZmqEventPublisher) -> Relay:
        relay = Relay(
            RelayConfig(
                engine_events=pub.endpoint,
                bind_events="tcp://127.0.0.1:*",
                keys=self.server,
                allow_dir=self.allow_dir,
                engine_replay=pub.replay_endpoint,
                bind_replay=None if pub.replay_endpoint is None else "tcp://127.0.0.1:*",
                replay_timeout_s=2.0,
            )
        )
        await relay.start()
        self.relays.append(relay)
        # As a direct subscriber would, the relay must be connected before the engine publishes:
        # else its SUB queues a backlog the gateway then gets live instead of by replay.
        assert await until(lambda: relay.engine_connected), "relay never reached its engine"
        return relay

    async def close(self) -> None:
        for relay in self.relays:
            await relay.close()
        self.relays.clear()


# The relay transport in force (one test at a time), or None: plain sockets, as engines bind them.
TRANSPORT: list[RelayTransport] = []


@dataclass
class Stack:
    """The router side: metrics, index and subscriber manager, wired as the gateway wires them."""

    metrics: Metrics
    index: PrefixIndex
    manager: SubscriberManager

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def status(self, source: SourceId) -> SourceStatus:
        for s in self.manager.status():
            if s.source == source:
                return s
        raise KeyError(source)

    async def applied(self, source: SourceId, seq: int, timeout_s: float = 10.0) -> bool:
        """Whether `source` applies `seq` (or later) within `timeout_s`."""
        return await applied(self.manager, source, seq, timeout_s)


async def applied(
    manager: SubscriberManager, source: SourceId, seq: int, timeout_s: float = 10.0
) -> bool:
    """Poll `manager.status()` until `source`'s last applied seq is >= `seq` (True), or the
    deadline passes (False)."""

    def done() -> bool:
        return any(
            s.source == source and s.last_seq is not None and s.last_seq >= seq
            for s in manager.status()
        )

    return await until(done, timeout_s, interval_s=0.005)


def make_stack(
    context: zmq.asyncio.Context,
    *,
    replay_timeout_s: float = 1.0,
    retry_backoff_s: tuple[float, float] = (0.05, 0.4),
    max_concurrent_replays: int = 4,
    tail_check_s: float = 0.0,
    **limits: Any,
) -> Stack:
    """The router side as the gateway builds it. The tail check is off unless a test asks for it:
    it asks an idle source's replay buffer, which would add `ok` replays to exact counts."""
    metrics = Metrics()
    index = new_index(counters=metrics.event_counters)
    if TRANSPORT and "curve_keys" not in limits:
        limits["curve_keys"] = TRANSPORT[0].client
    manager = SubscriberManager(
        index,
        metrics.event_counters,
        context=context,
        replay_timeout_s=replay_timeout_s,
        max_concurrent_replays=max_concurrent_replays,
        retry_backoff_s=retry_backoff_s,
        tail_check_s=tail_check_s,
        receive_impl=RECEIVE_IMPL,
        **limits,  # ingest_limits, max_message_bytes
    )
    metrics.watch_sources(manager.status)
    return Stack(metrics, index, manager)


@dataclass
class Feed:
    """One engine source: our publisher plus the batches it published since its last restart."""

    pub: ZmqEventPublisher
    engine: str
    rank: int
    stream: EngineStream
    published: list[VllmEventBatch] = field(default_factory=list)
    paused: bool = False
    relay: Relay | None = None  # in front of `pub` under a RelayTransport

    def pause(self) -> None:
        self.pub.pause()
        self.paused = True

    def resume(self) -> None:
        self.pub.resume()
        self.paused = False

    @property
    def source(self) -> SourceId:
        return source_id(self.engine, self.rank)

    def spec(self) -> SourceSpec:
        if self.relay is not None:
            return SourceSpec(
                engine=self.engine,
                model=MODEL,
                endpoint=self.relay.events_endpoint,
                replay_endpoint=self.relay.replay_endpoint,
                topic=self.pub.topic,
                rank=self.rank,
                curve_server_key=self.relay.config.keys.public.decode(),
            )
        return SourceSpec(
            engine=self.engine,
            model=MODEL,
            endpoint=self.pub.endpoint,
            replay_endpoint=self.pub.replay_endpoint,
            topic=self.pub.topic,
            rank=self.rank,
        )

    def publish(self, n: int = 1, events: int = 3) -> int:
        seq = -1
        for _ in range(n):
            batch = self.stream.batch(events)
            self.published.append(batch)
            seq = self.pub.publish(batch)
        return seq

    def publish_batch(self, batch: VllmEventBatch) -> int:
        self.published.append(batch)
        return self.pub.publish(batch)

    async def restart(self, seed: int) -> None:
        """Engine process restart: seq back to 0, a fresh (empty) cache."""
        await self.pub.restart()
        self.paused = False
        self.published = []
        self.stream = EngineStream(seed, rank=self.rank, hash_base=seed * 1_000_000)

    def reference(self) -> set[tuple[int, str]]:
        """What the index must hold for this source: the same bytes applied without loss."""
        index = new_index()
        index.add_source(self.source, engine=self.engine, model=MODEL)
        for batch in self.published:
            index.apply(self.source, decode_batch(encode_batch(batch, self.pub.release)))
        return {(int(h), m) for h, m in index.holdings(self.source)}

    async def attach(self, stack: Stack, *, backlog: int = 0) -> None:
        """Publish `backlog` batches first (a late join), subscribe, and settle."""
        if backlog:
            self.publish(backlog)
        await stack.manager.add_source(self.spec())
        await self.settle(stack)

    async def settle(self, stack: Stack, timeout_s: float = 10.0) -> None:
        """Publish until the subscriber applies a batch published after it connected, so the SUB
        subscription has reached the PUB (slow joiner) before a test injects faults."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        assert await until(lambda: stack.status(self.source).connected, timeout_s), (
            "subscriber never connected"
        )
        while True:
            seq = self.publish()
            if await stack.applied(self.source, seq, timeout_s=0.3):
                # Live stream flows: one more to be sure the last one came through it.
                seq = self.publish()
                assert await stack.applied(self.source, seq)
                return
            assert loop.time() < deadline, "no live batch ever arrived"


async def start_feed(
    context: zmq.asyncio.Context,
    engine: str = "engine-a",
    *,
    rank: int = 0,
    release: str = "0.33.0",
    replay: bool = True,
    seed: int = 1,
    buffer_steps: int = 10_000,
    hwm: int = 100_000,
    endpoint: str = "tcp://127.0.0.1:0",
    replay_endpoint: str = "tcp://127.0.0.1:0",
) -> Feed:
    pub = ZmqEventPublisher(
        endpoint,
        replay_endpoint=replay_endpoint if replay else None,
        topic="kv",
        release=release,
        buffer_steps=buffer_steps,
        hwm=hwm,
        context=context,
    )
    await pub.start()
    relay = await TRANSPORT[0].front(pub) if TRANSPORT else None
    stream = EngineStream(seed, rank=rank, hash_base=seed * 1_000_000)
    return Feed(pub, engine, rank, stream, relay=relay)


@contextlib.asynccontextmanager
async def feeding(
    context: zmq.asyncio.Context, engine: str = "engine-a", **options: Any
) -> AsyncIterator[Feed]:
    """`start_feed` for the length of an `async with`; the publisher is closed at the end."""
    feed = await start_feed(context, engine, **options)
    try:
        yield feed
    finally:
        await feed.pub.close()
        if feed.relay is not None:
            await feed.relay.close()


def holdings(stack: Stack, source: SourceId) -> set[tuple[int, str]]:
    return {(int(h), m) for h, m in stack.index.holdings(source)}


async def until(
    cond: Callable[[], bool], timeout_s: float = 10.0, *, interval_s: float = 0.01
) -> bool:
    """Poll `cond` until it holds (True) or the deadline passes (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(interval_s)
    return True


def free_port_pair() -> int:
    """A port P with P and P+1 both free on 127.0.0.1 (DP rank offsets), picked below the
    ephemeral range as the simulator's fleet picks its own (kvroute/sim/fleet.py)."""
    return _consecutive_free_ports("127.0.0.1", 2)


class ScriptedReplay:
    """A replay ROUTER (0.26+ layout) answering from `batches`, which a test may rewrite, to
    play an engine whose process changed under the same endpoints, or a replay server that
    fails: `garbage` answers with a reply no release sends, `silent` answers nothing, `no_end`
    leaves out the end marker, and `bootstrap_gate`, when set, holds answers to requests from
    seq 0 until it opens. `starts` records every request's start seq."""

    def __init__(self, context: zmq.asyncio.Context, topic: bytes = b"kv") -> None:
        self.sock = context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint: str = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.topic = topic
        self.batches: list[tuple[int, bytes]] = []
        self.garbage = False
        self.silent = False
        self.no_end = False
        self.bootstrap_gate: asyncio.Event | None = None
        self.starts: list[int] = []
        self._task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            if len(frames) != 3:
                continue
            identity, start = frames[0], int.from_bytes(frames[2], "big")
            self.starts.append(start)
            if self.bootstrap_gate is not None and start == 0:
                await self.bootstrap_gate.wait()
            if self.silent:
                continue
            if self.garbage:
                await self.sock.send_multipart([identity, b"", b"a", b"b", b"c", b"d"])
                continue
            for seq, payload in [b for b in self.batches if b[0] >= start]:
                await self.sock.send_multipart(
                    [identity, b"", self.topic, seq.to_bytes(8, "big"), payload]
                )
            if not self.no_end:
                await self.sock.send_multipart([identity, b"", b"", b"\xff" * 8, b""])

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sock.close(linger=0)
