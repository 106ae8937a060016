"""events/publisher.py and events/replay.py over real ZeroMQ sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import zmq.asyncio

from kvroute.errors import EngineError, WireError
from kvroute.events.publisher import ZmqEventPublisher, encode_batch
from kvroute.events.replay import END_SEQ, ReplayResult, request_replay
from kvroute.events.vllm_events import VllmBlockRemoved, VllmEventBatch
from kvroute.events.wire import decode_vllm
from tests.shared_fixtures import event_fixtures_dir, expected_json, fixture_versions, frames

DEADLINE_S = 10.0


def _batch(i: int) -> VllmEventBatch:
    return VllmEventBatch(1700000000.0 + i, [VllmBlockRemoved([i], "GPU", 0)], 0)


@pytest.fixture
async def context() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.term()


@pytest.fixture
async def publisher(context: zmq.asyncio.Context) -> AsyncIterator[ZmqEventPublisher]:
    async with ZmqEventPublisher(
        replay_endpoint="tcp://127.0.0.1:0", topic="kv", context=context
    ) as pub:
        yield pub


class _Sub:
    """A SUB socket on `pub` that has joined once `async with` enters (the PUB/SUB slow joiner
    is waited out by probing)."""

    def __init__(
        self, context: zmq.asyncio.Context, pub: ZmqEventPublisher, topic: bytes = b"kv"
    ) -> None:
        self.pub = pub
        self.sock = context.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(pub.endpoint)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)

    async def __aenter__(self) -> _Sub:
        try:
            await self._join()
        except BaseException:
            self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def _join(self) -> None:
        """Publish probes until one arrives, then drain them."""
        loop = asyncio.get_running_loop()
        end = loop.time() + DEADLINE_S
        while loop.time() < end:
            self.pub.publish_payload(b"probe")
            if await self.sock.poll(50):
                break
        else:
            raise AssertionError("subscriber never joined")
        while await self.sock.poll(50):
            await self.sock.recv_multipart()

    async def recv(self) -> list[bytes]:
        assert await self.sock.poll(int(DEADLINE_S * 1000)), "no live message"
        return list(await self.sock.recv_multipart())

    async def nothing_pending(self) -> bool:
        # A negative check needs some wait; messages on loopback arrive well within this.
        return not await self.sock.poll(200)

    def close(self) -> None:
        self.sock.close(linger=0)


async def _raw_replay(
    context: zmq.asyncio.Context, endpoint: str, request: list[bytes], count: int
) -> list[list[bytes]]:
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    try:
        await dealer.send_multipart(request)
        out = []
        for _ in range(count):
            assert await dealer.poll(int(DEADLINE_S * 1000)), f"got only {out}"
            out.append(list(await dealer.recv_multipart()))
        return out
    finally:
        dealer.close(linger=0)


def _fixture_batches(version: str) -> list[bytes]:
    return [
        (event_fixtures_dir() / version / f"{m['scenario']}.msgpack").read_bytes()
        for m in expected_json(version)["replay"]["messages"]
    ]


# --- frames as each release sends them ---------------------------------------------------------


@pytest.mark.parametrize("version", fixture_versions())
async def test_replay_reply_is_byte_identical_to_fixture(
    context: zmq.asyncio.Context, version: str
) -> None:
    async with ZmqEventPublisher(
        replay_endpoint="tcp://127.0.0.1:0", topic="kv", release=version, context=context
    ) as pub:
        for payload in _fixture_batches(version):
            pub.publish(decode_vllm(payload))
        want = frames(version, "replay")
        assert pub.replay_endpoint is not None
        got = await _raw_replay(context, pub.replay_endpoint, [b"", bytes(8)], len(want))
        assert got == want


@pytest.mark.parametrize("version", fixture_versions())
async def test_live_frames_match_fixture(context: zmq.asyncio.Context, version: str) -> None:
    async with (
        ZmqEventPublisher(topic="kv", release=version, context=context) as pub,
        _Sub(context, pub) as sub,
    ):
        base = pub.next_seq
        for payload in _fixture_batches(version):
            pub.publish(decode_vllm(payload))
        for i, (topic, _seq, payload) in enumerate(frames(version, "live")):
            assert await sub.recv() == [topic, (base + i).to_bytes(8, "big"), payload]


@pytest.mark.parametrize(
    ("release", "topic_frame"),
    [("0.9.0", False), ("0.22.0", False), ("0.25.0", False), ("0.26.0", True), ("0.33.0", True)],
)
async def test_replay_frame_layout_per_release(
    context: zmq.asyncio.Context, release: str, topic_frame: bool
) -> None:
    async with ZmqEventPublisher(
        replay_endpoint="tcp://127.0.0.1:0", topic="kv", release=release, context=context
    ) as pub:
        pub.publish(_batch(0))
        assert pub.replay_endpoint is not None
        data, end = await _raw_replay(context, pub.replay_endpoint, [b"", bytes(8)], 2)
        head = [b"", b"kv"] if topic_frame else [b""]
        assert data == [*head, bytes(8), encode_batch(_batch(0), release)]
        assert end == [b"", b"", END_SEQ, b""] if topic_frame else [b"", END_SEQ, b""]


# --- publishing and replay ---------------------------------------------------------------------


async def test_publish_returns_consecutive_seqs_and_payload_decodes(
    context: zmq.asyncio.Context, publisher: ZmqEventPublisher
) -> None:
    async with _Sub(context, publisher) as sub:
        first = publisher.next_seq
        assert [publisher.publish(_batch(i)) for i in range(3)] == [first, first + 1, first + 2]
        for i in range(3):
            topic, seq, payload = await sub.recv()
            assert (topic, int.from_bytes(seq, "big")) == (b"kv", first + i)
            assert decode_vllm(payload) == _batch(i)


async def test_endpoints_are_real_connect_addresses(publisher: ZmqEventPublisher) -> None:
    assert publisher.endpoint.startswith("tcp://127.0.0.1:")
    assert not publisher.endpoint.endswith(":0")
    assert publisher.replay_endpoint is not None
    assert publisher.replay_endpoint.startswith("tcp://127.0.0.1:")
    assert publisher.replay_endpoint != publisher.endpoint


async def test_wildcard_bind_reports_loopback(context: zmq.asyncio.Context) -> None:
    async with ZmqEventPublisher("tcp://*:0", context=context) as pub:
        assert pub.endpoint.startswith("tcp://127.0.0.1:")
        assert pub.replay_endpoint is None


async def test_request_replay_from_middle(
    context: zmq.asyncio.Context, publisher: ZmqEventPublisher
) -> None:
    payloads = [publisher.publish_payload(encode_batch(_batch(i))) for i in range(5)]
    assert payloads == [0, 1, 2, 3, 4]
    assert publisher.replay_endpoint is not None
    result = await request_replay(context, publisher.replay_endpoint, 2)
    assert result == ReplayResult([(i, encode_batch(_batch(i))) for i in (2, 3, 4)], True)


async def test_request_replay_past_newest_gets_only_end_marker(
    context: zmq.asyncio.Context, publisher: ZmqEventPublisher
) -> None:
    publisher.publish(_batch(0))
    assert publisher.replay_endpoint is not None
    assert await request_replay(context, publisher.replay_endpoint, 9) == ReplayResult([], True)


async def test_replay_buffer_is_bounded(context: zmq.asyncio.Context) -> None:
    async with ZmqEventPublisher(
        replay_endpoint="tcp://127.0.0.1:0", buffer_steps=3, context=context
    ) as pub:
        for i in range(7):
            pub.publish(_batch(i))
        assert pub.buffered == 3
        assert pub.replay_endpoint is not None
        result = await request_replay(context, pub.replay_endpoint, 0)
        assert [seq for seq, _ in result.batches] == [4, 5, 6] and result.complete


async def test_large_replay_arrives_whole_on_0_33(context: zmq.asyncio.Context) -> None:
    async with ZmqEventPublisher(
        replay_endpoint="tcp://127.0.0.1:0", buffer_steps=3000, context=context
    ) as pub:
        for i in range(2500):
            pub.publish(_batch(i))
        assert pub.replay_endpoint is not None
        result = await request_replay(context, pub.replay_endpoint, 0, timeout_s=DEADLINE_S)
        assert result.complete and [s for s, _ in result.batches] == list(range(2500))


async def test_garbage_payload_is_published_as_is(
    context: zmq.asyncio.Context, publisher: ZmqEventPublisher
) -> None:
    async with _Sub(context, publisher) as sub:
        seq = publisher.publish_payload(b"\xc1 not msgpack")
        assert await sub.recv() == [b"kv", seq.to_bytes(8, "big"), b"\xc1 not msgpack"]


async def test_invalid_replay_request_gets_no_reply_and_server_keeps_serving(
    context: zmq.asyncio.Context, publisher: ZmqEventPublisher
) -> None:
    publisher.publish(_batch(0))
    assert publisher.replay_endpoint is not None
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(publisher.replay_endpoint)
    try:
        await dealer.send_multipart([b"", bytes(8), b"extra"])
        await dealer.send_multipart([bytes(8)])  # no delimiter
        assert not await dealer.poll(200)
    finally:
        dealer.close(linger=0)
    result = await request_replay(context, publisher.replay_endpoint, 0)
    assert [s for s, _ in result.batches] == [0] and result.complete


async def test_request_replay_with_nobody_listening_times_out_incomplete(
    context: zmq.asyncio.Context,
) -> None:
    probe = context.socket(zmq.ROUTER)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(linger=0)  # a port nothing serves any more
    loop = asyncio.get_running_loop()
    start = loop.time()
    result = await request_replay(context, f"tcp://127.0.0.1:{port}", 0, timeout_s=0.3)
    assert result == ReplayResult([], False)
    assert loop.time() - start < DEADLINE_S


async def test_request_replay_bad_endpoint_raises_engine_error(
    context: zmq.asyncio.Context,
) -> None:
    with pytest.raises(EngineError, match="replay"):
        await request_replay(context, "not-an-endpoint", 0, timeout_s=0.3)


async def test_request_replay_bad_start_seq_raises_wire_error(
    context: zmq.asyncio.Context,
) -> None:
    with pytest.raises(WireError, match="start_seq"):
        await request_replay(context, "tcp://127.0.0.1:1", -1)


async def test_request_replay_malformed_reply_raises_wire_error(
    context: zmq.asyncio.Context,
) -> None:
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    async def answer() -> None:
        identity, _, _ = await router.recv_multipart()
        await router.send_multipart([identity, b"", b"\x01\x02", b"payload"])

    server = asyncio.create_task(answer())
    try:
        with pytest.raises(WireError, match="seq: expected 8 bytes"):
            await request_replay(context, f"tcp://127.0.0.1:{port}", 0, timeout_s=DEADLINE_S)
        await server
    finally:
        router.close(linger=0)


# --- fault switches ------------------------------------------------------------------------------


async def test_drop_next_takes_seq_and_buffers_but_does_not_send(
    context: zmq.asyncio.Context, publisher: ZmqEventPublisher
) -> None:
    async with _Sub(context, publisher) as sub:
        base = publisher.next_seq
        publisher.drop_next(2)
        seqs = [publisher.publish(_batch(i)) for i in range(3)]
        assert seqs == [base, base + 1, base + 2]
        _, seq, payload = await sub.recv()
        assert int.from_bytes(seq, "big") == base + 2 and decode_vllm(payload) == _batch(2)
        assert publisher.replay_endpoint is not None
        result = await request_replay(context, publisher.replay_endpoint, base)
        assert [s for s, _ in result.batches] == seqs


async def test_pause_queues_and_resume_flushes_in_order(
    context: zmq.asyncio.Context, publisher: ZmqEventPublisher
) -> None:
    async with _Sub(context, publisher) as sub:
        base = publisher.next_seq
        publisher.pause()
        assert [publisher.publish(_batch(i)) for i in range(3)] == [base, base + 1, base + 2]
        assert publisher.next_seq == base
        assert await sub.nothing_pending()
        publisher.resume()
        assert publisher.next_seq == base + 3
        for i in range(3):
            _, seq, payload = await sub.recv()
            assert int.from_bytes(seq, "big") == base + i and decode_vllm(payload) == _batch(i)


async def test_restart_rebinds_same_ports_with_seq_zero_and_empty_buffer(
    context: zmq.asyncio.Context, publisher: ZmqEventPublisher
) -> None:
    async with _Sub(context, publisher) as sub:
        endpoint, replay_endpoint = publisher.endpoint, publisher.replay_endpoint
        publisher.publish(_batch(1))
        assert (await sub.recv())[2] == encode_batch(_batch(1))
        await publisher.restart()
        assert (publisher.endpoint, publisher.replay_endpoint) == (endpoint, replay_endpoint)
        assert publisher.next_seq == 0 and publisher.buffered == 0
        assert replay_endpoint is not None
        assert await request_replay(context, replay_endpoint, 0) == ReplayResult([], True)
        # The SUB reconnects by itself and sees seq restart from 0; no AllBlocksCleared is sent.
        loop = asyncio.get_running_loop()
        end = loop.time() + DEADLINE_S
        sent = 0
        while loop.time() < end:
            publisher.publish_payload(b"after")
            sent += 1
            if await sub.sock.poll(50):
                break
        _, seq, payload = await sub.recv()
        assert payload == b"after" and int.from_bytes(seq, "big") < sent


async def test_stop_replay_then_start_replay_on_same_port(
    context: zmq.asyncio.Context, publisher: ZmqEventPublisher
) -> None:
    publisher.publish(_batch(0))
    replay_endpoint = publisher.replay_endpoint
    assert replay_endpoint is not None
    await publisher.stop_replay()
    assert await request_replay(context, replay_endpoint, 0, timeout_s=0.3) == ReplayResult(
        [], False
    )
    await publisher.start_replay()
    assert publisher.replay_endpoint == replay_endpoint
    result = await request_replay(context, replay_endpoint, 0, timeout_s=DEADLINE_S)
    assert [s for s, _ in result.batches] == [0] and result.complete


async def test_publish_before_start_is_an_error(context: zmq.asyncio.Context) -> None:
    pub = ZmqEventPublisher(context=context)
    with pytest.raises(RuntimeError, match="not started"):
        pub.publish(_batch(0))
    await pub.close()


async def test_close_is_idempotent_and_owns_its_context(context: zmq.asyncio.Context) -> None:
    pub = ZmqEventPublisher(replay_endpoint="tcp://127.0.0.1:0")
    await pub.start()
    endpoints = [pub.endpoint, pub.replay_endpoint]
    await pub.close()
    await pub.close()
    with pytest.raises(RuntimeError, match="already closed"):
        pub.publish(_batch(0))
    assert pub._context.closed  # the context it created is terminated with it
    # ...after both sockets: their ports are free again.
    for endpoint in endpoints:
        assert endpoint is not None
        sock = context.socket(zmq.ROUTER)
        try:
            sock.bind(endpoint)
        finally:
            sock.close(linger=0)
    # A context passed in is the caller's: closing the publisher leaves it usable.
    shared = ZmqEventPublisher(context=context)
    await shared.start()
    await shared.close()
    await shared.close()
    assert not context.closed
    context.socket(zmq.PUB).close(linger=0)


@pytest.mark.parametrize("endpoint", ["udp://x:1", "tcp://host", "garbage"])
def test_bad_endpoint_is_a_value_error(endpoint: str) -> None:
    with pytest.raises(ValueError, match="endpoint: expected"):
        ZmqEventPublisher(endpoint)


def test_bad_release_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="vLLM release"):
        ZmqEventPublisher(release="0.8.0")


async def test_restart_brings_a_stopped_replay_back_and_forgets_faults(
    context: zmq.asyncio.Context, publisher: ZmqEventPublisher
) -> None:
    replay_endpoint = publisher.replay_endpoint
    assert replay_endpoint is not None
    await publisher.stop_replay()
    publisher.pause()
    publisher.publish(_batch(0))
    publisher.drop_next(5)
    await publisher.restart()
    assert publisher.replay_endpoint == replay_endpoint and publisher.next_seq == 0
    assert publisher.publish(_batch(1)) == 0  # not queued: the new process is not paused
    result = await request_replay(context, replay_endpoint, 0, timeout_s=DEADLINE_S)
    assert result == ReplayResult([(0, encode_batch(_batch(1)))], True)


async def test_ipv6_loopback_endpoint(context: zmq.asyncio.Context) -> None:
    pub = ZmqEventPublisher("tcp://[::1]:0", replay_endpoint="tcp://[::1]:0", context=context)
    try:
        await pub.start()
    except zmq.ZMQError as exc:  # a host without IPv6 loopback
        pytest.skip(f"no IPv6 loopback: {exc}")
    try:
        assert pub.endpoint.startswith("tcp://[::1]:") and pub.replay_endpoint is not None
        pub.publish(_batch(0))
        result = await request_replay(context, pub.replay_endpoint, 0, timeout_s=DEADLINE_S)
        assert [s for s, _ in result.batches] == [0] and result.complete
    finally:
        await pub.close()
