"""CURVE through `kvroute relay` on real sockets: an allow-listed gateway ingests; no key, an
unknown key or another server key get nothing and are counted; an impostor feeds nothing."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from kvroute.core import SourceSpec, source_id
from kvroute.errors import ConfigError
from kvroute.events import (
    CurveClientKeys,
    CurveKeyPair,
    ZmqEventPublisher,
    curve_client,
    curve_server,
    encode_batch,
)
from kvroute.metrics import RelayMetrics
from kvroute.relay import Relay, RelayConfig
from kvroute.relay.http import serve_metrics
from tests.event_harness import (
    MODEL,
    Feed,
    ScriptedReplay,
    Stack,
    holdings,
    make_stack,
    start_feed,
)
from tests.event_streams import EngineStream
from tests.polling import eventually
from tests.zmq.relay.conftest import Keys


def _config(keys: Keys, feed_or_pub: Feed | ZmqEventPublisher, **options: object) -> RelayConfig:
    pub = feed_or_pub.pub if isinstance(feed_or_pub, Feed) else feed_or_pub
    return RelayConfig(
        engine_events=pub.endpoint,
        bind_events="tcp://127.0.0.1:*",
        keys=keys.relay,
        allow_dir=keys.allow_dir,
        engine_replay=pub.replay_endpoint,
        bind_replay=None if pub.replay_endpoint is None else "tcp://127.0.0.1:*",
        **options,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def _relayed_feed(
    ctx: zmq.asyncio.Context, keys: Keys, **options: object
) -> AsyncIterator[tuple[Feed, Relay]]:
    feed = await start_feed(ctx)
    relay = Relay(_config(keys, feed, **options))
    try:
        await relay.start()
        yield feed, relay
    finally:
        await relay.close()
        await feed.pub.close()


def _spec(relay: Relay, engine: str = "engine-a", server_key: str | None = "relay") -> SourceSpec:
    key = relay.config.keys.public.decode() if server_key == "relay" else server_key
    return SourceSpec(
        engine=engine,
        model=MODEL,
        endpoint=relay.events_endpoint,
        replay_endpoint=relay.replay_endpoint,
        topic="kv",
        curve_server_key=key,
    )


@contextlib.asynccontextmanager
async def _stack(ctx: zmq.asyncio.Context, pair: CurveKeyPair | None) -> AsyncIterator[Stack]:
    stack = make_stack(ctx, retry_backoff_s=(0.05, 0.4), curve_keys=pair)
    try:
        yield stack
    finally:
        await asyncio.wait_for(stack.manager.close(), 5)


async def _flowing(feed: Feed, stack: Stack, source: str) -> int:
    """Publish until `stack` applies a batch published after it connected: the positive control
    that what a refused subscriber missed really went out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        seq = feed.publish()
        if await stack.applied(source_id(source, 0), seq, timeout_s=0.2):
            return seq
        assert loop.time() < deadline, "the allowed gateway never received a live batch"


async def test_an_allow_listed_gateway_ingests_through_the_relay_as_directly(
    ctx: zmq.asyncio.Context, keys: Keys
) -> None:
    async with _relayed_feed(ctx, keys) as (feed, relay), _stack(ctx, keys.gateway) as stack:
        last = feed.publish(10)  # a late join: bootstrapped by replay through the relay
        await stack.manager.add_source(_spec(relay))
        assert await stack.applied(feed.source, last)
        await _flowing(feed, stack, "engine-a")
        feed.pub.drop_next(3)  # a gap, repaired by replay through the relay
        feed.publish(3)
        last = feed.publish(2)
        assert await stack.applied(feed.source, last)
        assert holdings(stack, feed.source) == feed.reference()
        assert stack.sample("kvroute_seq_gaps_total", source=feed.source) == 1
        assert stack.status(feed.source).connected
        c = relay.counters
        assert c.handshakes[("events", "ok")] >= 1
        assert c.handshakes[("replay", "ok")] >= 2  # bootstrap and the gap
        assert c.replays["ok"] >= 2
        assert c.denied() == 0
        assert c.forwarded_messages >= 3
        assert stack.sample("kvroute_handshake_failures_total", source=feed.source) == 0


# A client without a key may see the mechanism mismatch and hang up before the relay sees it:
# then the relay counts an `aborted` handshake; which side sees it first is a race.
NO_KEY = ("no_key", "aborted")


def _refused(relay: Relay, socket: str, reasons: tuple[str, ...]) -> int:
    return sum(relay.counters.handshakes[(socket, r)] for r in reasons)


@pytest.mark.parametrize(
    ("who", "reasons"),
    [
        ("no key", NO_KEY),
        ("an unknown key", ("unknown_key",)),
        ("another server key", ("wrong_server_key",)),
    ],
)
async def test_a_refused_subscriber_gets_nothing_and_is_counted_on_the_relay(
    ctx: zmq.asyncio.Context, keys: Keys, who: str, reasons: tuple[str, ...]
) -> None:
    pair, server_key = {
        "no key": (None, None),
        "an unknown key": (keys.stranger, "relay"),
        "another server key": (keys.gateway, keys.stranger.public.decode()),
    }[who]
    async with (
        _relayed_feed(ctx, keys) as (feed, relay),
        _stack(ctx, keys.gateway) as allowed,
        _stack(ctx, pair) as refused,
    ):
        feed.publish(5)
        await refused.manager.add_source(_spec(relay, "refused", server_key))
        await allowed.manager.add_source(_spec(relay, "allowed"))
        await eventually(lambda: _refused(relay, "events", reasons) >= 1, f"{reasons} counted")
        await _flowing(feed, allowed, "allowed")
        # The replay ROUTER refuses the same client: its request reaches nobody.
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        if pair is not None and server_key is not None:
            server = relay.config.keys.public if server_key == "relay" else server_key.encode()
            curve_client(dealer, CurveClientKeys(pair, server))
        assert relay.replay_endpoint is not None
        dealer.connect(relay.replay_endpoint)
        try:
            await eventually(
                lambda: _refused(relay, "replay", reasons) >= 1, f"{reasons} on replay"
            )
            await _flowing(feed, allowed, "allowed")
            assert await dealer.poll(timeout=0) == 0
        finally:
            dealer.close(linger=0)
        src = source_id("refused", 0)
        status = refused.status(src)
        assert (status.connected, status.last_seq, status.blocks) == (False, None, 0)
        assert not holdings(refused, src)
        assert refused.sample("kvroute_handshake_failures_total", source=src) >= 1
        assert relay.counters.handshakes[("events", "ok")] == 1  # the allowed gateway only
        rendered = RelayMetrics(relay.counters).render()[0].decode()
        assert any(
            f'kvroute_relay_handshakes_total{{outcome="{r}",socket="events"}}' in rendered
            for r in reasons
        )


async def test_a_raw_plain_subscriber_receives_nothing(
    ctx: zmq.asyncio.Context, keys: Keys
) -> None:
    async with _relayed_feed(ctx, keys) as (feed, relay), _stack(ctx, keys.gateway) as allowed:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.subscribe(b"")
        sub.connect(relay.events_endpoint)
        try:
            await eventually(lambda: _refused(relay, "events", NO_KEY) >= 1, "no key counted")
            await allowed.manager.add_source(_spec(relay, "allowed"))
            await _flowing(feed, allowed, "allowed")
            await _flowing(feed, allowed, "allowed")
            assert await sub.poll(timeout=0) == 0
        finally:
            sub.close(linger=0)


async def test_a_key_added_to_the_allow_dir_is_let_in_once_reloaded(
    ctx: zmq.asyncio.Context, keys: Keys
) -> None:
    async with (
        _relayed_feed(ctx, keys, allow_reload_s=0.05) as (feed, relay),
        _stack(ctx, keys.stranger) as stranger,
    ):
        await stranger.manager.add_source(_spec(relay, "stranger"))
        await eventually(lambda: relay.counters.handshakes[("events", "unknown_key")] >= 1, "deny")
        shutil.copy(keys.dir / "stranger.key", keys.allow_dir / "stranger.key")
        await eventually(lambda: relay.counters.allow_list_keys == 2, "the new key loaded")
        await _flowing(feed, stranger, "stranger")
        (keys.allow_dir / "stranger.key").unlink()
        await eventually(lambda: relay.counters.allow_list_keys == 1, "the key removed")
        assert relay.counters.allow_list_reloads["ok"] == 3


async def test_a_file_in_the_allow_dir_that_is_not_a_key_is_skipped_and_counted(
    ctx: zmq.asyncio.Context, keys: Keys
) -> None:
    (keys.allow_dir / "junk.key").write_text('curve\n    public-key = "short"\n')
    async with (
        _relayed_feed(ctx, keys) as (feed, relay),
        _stack(ctx, keys.gateway) as stack,
    ):
        assert relay.counters.allow_list_keys == 1
        assert relay.counters.allow_list_reloads["error"] == 1
        await stack.manager.add_source(_spec(relay))
        await _flowing(feed, stack, "engine-a")


@pytest.mark.parametrize("impostor", ["plain", "curve with another secret"])
async def test_an_impostor_publisher_feeds_nothing_to_a_gateway_expecting_the_relay(
    ctx: zmq.asyncio.Context, keys: Keys, impostor: str
) -> None:
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    if impostor != "plain":
        curve_server(pub, keys.stranger)
    pub.bind("tcp://127.0.0.1:*")
    endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    stream = EngineStream(9)
    source = source_id("engine-a", 0)
    spec = SourceSpec(
        engine="engine-a",
        model=MODEL,
        endpoint=endpoint,
        topic="kv",
        curve_server_key=keys.relay.public.decode(),
    )
    try:
        async with _stack(ctx, keys.gateway) as stack:
            await stack.manager.add_source(spec)
            seq = 0

            async def feeding_fails_twice() -> bool:
                nonlocal seq
                await pub.send_multipart(
                    [b"kv", seq.to_bytes(8, "big"), encode_batch(stream.batch(), "0.33.0")]
                )
                seq += 1
                return stack.sample("kvroute_handshake_failures_total", source=source) >= 2

            # Retried (after a backoff), and refused again: the impostor never gets through.
            await eventually(feeding_fails_twice, "two failed handshakes")
            status = stack.status(source)
            assert (status.connected, status.last_seq, status.blocks) == (False, None, 0)
            assert stack.sample("kvroute_event_batches_total", source=source) == 0
    finally:
        pub.close(linger=0)


async def _dealer(ctx: zmq.asyncio.Context, relay: Relay, keys: Keys) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    curve_client(sock, CurveClientKeys(keys.gateway, keys.relay.public))
    assert relay.replay_endpoint is not None
    sock.connect(relay.replay_endpoint)
    return sock


async def test_replays_are_bounded_and_malformed_requests_get_no_reply(
    ctx: zmq.asyncio.Context, keys: Keys
) -> None:
    engine = ScriptedReplay(ctx)
    engine.silent = True  # the engine never answers: the one slot stays taken
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    config = RelayConfig(
        engine_events=pub.getsockopt_string(zmq.LAST_ENDPOINT),
        bind_events="tcp://127.0.0.1:*",
        keys=keys.relay,
        allow_dir=keys.allow_dir,
        engine_replay=engine.endpoint,
        bind_replay="tcp://127.0.0.1:*",
        max_replays=1,
        replay_timeout_s=0.5,
    )
    relay = Relay(config)
    socks: list[zmq.asyncio.Socket] = []
    try:
        await relay.start()
        socks += [await _dealer(ctx, relay, keys) for _ in range(3)]
        first, second, bad = socks
        await first.send_multipart([b"", (0).to_bytes(8, "big")])
        await eventually(lambda: engine.starts == [0], "the first request reached the engine")
        await second.send_multipart([b"", (5).to_bytes(8, "big")])
        await bad.send_multipart([b"", b"\x01\x02"])
        await eventually(lambda: relay.counters.replays["refused"] == 1, "refused")
        await eventually(lambda: relay.counters.replays["bad_request"] == 1, "bad request")
        await eventually(lambda: relay.counters.replays["timeout"] == 1, "timed out")
        assert engine.starts == [0]  # neither of the others reached the engine
        # The slot is free again: a request gets a full answer, end marker included.
        engine.silent = False
        engine.batches = [(7, b"p7"), (8, b"p8")]
        await second.send_multipart([b"", (8).to_bytes(8, "big")])
        replies = [await asyncio.wait_for(second.recv_multipart(), 5) for _ in range(2)]
        assert replies == [
            [b"", b"kv", (8).to_bytes(8, "big"), b"p8"],
            [b"", b"", b"\xff" * 8, b""],
        ]
        await eventually(lambda: relay.counters.replays["ok"] == 1, "ok")
    finally:
        for sock in socks:
            sock.close(linger=0)
        await relay.close()
        await engine.close()
        pub.close(linger=0)


async def test_the_simulators_publisher_can_be_the_curve_server_itself(
    ctx: zmq.asyncio.Context, keys: Keys
) -> None:
    pub = ZmqEventPublisher(replay_endpoint="tcp://127.0.0.1:0", topic="kv", curve=keys.relay)
    await pub.start()
    feed = Feed(pub, "engine-a", 0, EngineStream(3))
    spec = SourceSpec(
        engine="engine-a",
        model=MODEL,
        endpoint=pub.endpoint,
        replay_endpoint=pub.replay_endpoint,
        topic="kv",
        curve_server_key=keys.relay.public.decode(),
    )
    try:
        async with _stack(ctx, keys.gateway) as stack, _stack(ctx, None) as plain:
            last = feed.publish(4)
            await stack.manager.add_source(spec)
            assert await stack.applied(feed.source, last)
            await plain.manager.add_source(
                SourceSpec(engine="engine-a", model=MODEL, endpoint=pub.endpoint, topic="kv")
            )
            await eventually(
                lambda: plain.sample("kvroute_handshake_failures_total", source=feed.source) >= 1,
                "a plain subscriber refused",
            )
            await _flowing(feed, stack, "engine-a")
            assert holdings(stack, feed.source) == feed.reference()
            assert plain.status(feed.source).last_seq is None
    finally:
        await pub.close()


async def test_a_source_with_a_server_key_needs_the_gateways_key_pair(
    ctx: zmq.asyncio.Context, keys: Keys
) -> None:
    spec = SourceSpec(
        engine="e", model=MODEL, endpoint="tcp://127.0.0.1:1", curve_server_key="x" * 40
    )
    async with _stack(ctx, None) as stack:
        with pytest.raises(ConfigError, match="no CURVE key pair"):
            await stack.manager.add_source(spec)
    async with _stack(ctx, keys.gateway) as stack:
        bad = SourceSpec(
            engine="e", model=MODEL, endpoint="tcp://127.0.0.1:1", curve_server_key="short"
        )
        with pytest.raises(ConfigError, match="curve_server_key"):
            await stack.manager.add_source(bad)
        assert stack.manager.sources() == []


async def test_the_relay_refuses_a_missing_allow_dir_and_an_unbindable_endpoint(
    ctx: zmq.asyncio.Context, keys: Keys, tmp_path: Path
) -> None:
    feed = await start_feed(ctx)
    try:
        config = _config(keys, feed)
        with pytest.raises(ConfigError, match="allow-list"):
            Relay(RelayConfig(**{**config.__dict__, "allow_dir": tmp_path / "none"}))
        with pytest.raises(ConfigError, match="bind events"):
            relay = Relay(RelayConfig(**{**config.__dict__, "bind_events": "nonsense"}))
            await relay.start()
        with pytest.raises(ConfigError, match="both or neither"):
            RelayConfig(**{**config.__dict__, "bind_replay": None})
    finally:
        await feed.pub.close()


async def test_the_metrics_endpoint_serves_the_relays_counters(
    ctx: zmq.asyncio.Context, keys: Keys
) -> None:
    async with _relayed_feed(ctx, keys) as (_feed, relay):
        server = await serve_metrics("127.0.0.1", 0, RelayMetrics(relay.counters).render)
        port = server.sockets[0].getsockname()[1]
        try:
            for path, status, text in [
                ("/metrics", b"200", b"kvroute_relay_allow_list_keys 1.0"),
                ("/healthz", b"200", b"ok"),
                ("/nope", b"404", b"not found"),
            ]:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                body = await asyncio.wait_for(reader.read(), 5)
                writer.close()
                assert body.split(b" ")[1] == status and text in body, body
        finally:
            server.close()
            await server.wait_closed()
