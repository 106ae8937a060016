"""Encode and publish KV-event batches exactly as a given vLLM release does (for tests and the sim).
Byte-exact per release: pinned by tests/unit/events/test_publisher.py against the fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Final

import msgspec
import zmq.asyncio

from kvroute.events.curve import CurveKeyPair, curve_server
from kvroute.events.vllm_events import (
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEventBatch,
)

__all__ = ["SUPPORTED_RELEASES", "ZmqEventPublisher", "encode_batch", "release_layout"]

# The first release of each wire layout; any release in between uses the layout in force.
SUPPORTED_RELEASES: Final[tuple[str, ...]] = (
    "0.9.0",  # [ts, events]; array events; BlockStored 5 fields, BlockRemoved 1
    "0.9.1",  # [ts, events, data_parallel_rank]
    "0.10.2",  # medium
    "0.14.0",  # lora_name
    "0.17.0",  # extra_keys
    "0.20.0",  # group_idx
    "0.22.0",  # kv_cache_spec_kind, kv_cache_spec_sliding_window
    "0.24.0",  # map events {"type": tag, ...}, omit_defaults
    "0.26.0",  # locality; replay replies carry the topic frame
    "0.29.0",  # ownership
    "0.30.0",  # session_id
    "0.33.0",  # lookahead_token_ids; replay ROUTER SNDHWM = 2 * (buffer_steps + 1)
)
_FIRST: Final = (0, 9, 0)
_BEYOND: Final = (0, 34, 0)  # 0.33.x patch releases share 0.33.0's layout
# "0.22.0", "v0.22.0", "0.10.1.1", "0.11.0rc1", "0.9.2.post1", "0.33.0+cu128"; suffix items start
# with a non-digit, so matching never backtracks exponentially.
_RELEASE = re.compile(
    r"^v?(\d+)\.(\d+)(?:\.(\d+))?"  # major.minor[.patch]
    r"(?:\.\d+|[.+\-]?(?:post|rc|dev|a|b)\d*)*"  # .1, rc1, .post1, .dev3
    r"(?:\+[0-9A-Za-z.]+)?$"  # +cu128
)

_END_SEQ: Final = b"\xff" * 8
_ZMQ_DEFAULT_SNDHWM: Final = 1000

# (field name, has a default) in declaration order, with the first release that declares it.
# A field without a default is always written, even as nil, in map mode (omit_defaults).
_STORED_FIELDS: Final = (
    ("block_hashes", False, (0, 9, 0)),
    ("parent_block_hash", False, (0, 9, 0)),
    ("token_ids", False, (0, 9, 0)),
    ("block_size", False, (0, 9, 0)),
    ("lora_id", False, (0, 9, 0)),
    ("medium", False, (0, 10, 2)),
    ("lora_name", False, (0, 14, 0)),
    ("extra_keys", True, (0, 17, 0)),
    ("group_idx", True, (0, 20, 0)),
    ("kv_cache_spec_kind", True, (0, 22, 0)),
    ("kv_cache_spec_sliding_window", True, (0, 22, 0)),
    ("locality", True, (0, 26, 0)),
    ("ownership", True, (0, 29, 0)),
    ("session_id", True, (0, 30, 0)),
    ("lookahead_token_ids", True, (0, 33, 0)),
)
_REMOVED_FIELDS: Final = (
    ("block_hashes", False, (0, 9, 0)),
    ("medium", False, (0, 10, 2)),
    ("group_idx", True, (0, 20, 0)),
    ("locality", True, (0, 26, 0)),
    ("ownership", True, (0, 29, 0)),
)


def _parse_release(release: str) -> tuple[int, int, int]:
    match = _RELEASE.match(release.strip()) if isinstance(release, str) else None
    if match is None:
        raise ValueError(f"vLLM release: expected a version like '0.33.0', got {release!r}")
    version = (int(match[1]), int(match[2]), int(match[3] or 0))
    if not _FIRST <= version < _BEYOND:
        raise ValueError(
            f"vLLM release: expected 0.9.0 to 0.33.x (KV events exist from 0.9.0), got {release!r}"
        )
    return version


@dataclass(frozen=True)
class _Layout:
    """Everything about one release's bytes: Struct classes and frame shapes."""

    release: str  # the first release of this layout (one of SUPPORTED_RELEASES)
    map_events: bool
    batch_has_rank: bool
    replay_topic_frame: bool
    replay_sndhwm: Callable[[int], int]  # buffer_steps -> SNDHWM of the replay ROUTER
    stored: type[msgspec.Struct]
    removed: type[msgspec.Struct]
    cleared: type[msgspec.Struct]
    batch: type[msgspec.Struct]
    stored_fields: tuple[str, ...]
    removed_fields: tuple[str, ...]


def release_layout(release: str) -> str:
    """The first release of the wire layout `release` uses (one of SUPPORTED_RELEASES)."""
    return _layout(release).release


def _layout(release: str) -> _Layout:
    version = _parse_release(release)
    first = max((r for r in SUPPORTED_RELEASES if _parse_release(r) <= version), key=_parse_release)
    return _build_layout(first)


@cache
def _build_layout(first: str) -> _Layout:
    version = _parse_release(first)
    map_events = version >= (0, 24, 0)
    options: dict[str, Any] = {"tag": True, "omit_defaults": True, "gc": False}
    if not map_events:
        options["array_like"] = True

    def struct(name: str, spec: tuple[tuple[str, bool, tuple[int, int, int]], ...]) -> Any:
        fields: list[Any] = []
        for field, has_default, since in spec:
            if since > version:
                continue
            fields.append((field, Any, None) if has_default else (field, Any))
        return msgspec.defstruct(name, fields, **options), tuple(f[0] for f in fields)

    stored, stored_fields = struct("BlockStored", _STORED_FIELDS)
    removed, removed_fields = struct("BlockRemoved", _REMOVED_FIELDS)
    cleared = msgspec.defstruct("AllBlocksCleared", [], **options)
    batch_has_rank = version >= (0, 9, 1)
    batch_fields: list[Any] = [("ts", float), ("events", list)]
    if batch_has_rank:
        batch_fields.append(("data_parallel_rank", Any, None))
    batch = msgspec.defstruct(
        "KVEventBatch", batch_fields, array_like=True, omit_defaults=True, gc=False
    )
    return _Layout(
        release=first,
        map_events=map_events,
        batch_has_rank=batch_has_rank,
        replay_topic_frame=version >= (0, 26, 0),
        replay_sndhwm=(
            (lambda steps: 2 * (steps + 1))
            if version >= (0, 33, 0)
            else (lambda _steps: _ZMQ_DEFAULT_SNDHWM)
        ),
        stored=stored,
        removed=removed,
        cleared=cleared,
        batch=batch,
        stored_fields=stored_fields,
        removed_fields=removed_fields,
    )


_encoder: Final = msgspec.msgpack.Encoder()


def _to_release(layout: _Layout, event: object) -> msgspec.Struct:
    # Fields the release does not have are dropped, as that release's engine could not send them.
    if isinstance(event, VllmBlockStored):
        return layout.stored(*(getattr(event, f) for f in layout.stored_fields))
    if isinstance(event, VllmBlockRemoved):
        return layout.removed(*(getattr(event, f) for f in layout.removed_fields))
    if isinstance(event, VllmAllBlocksCleared):
        return layout.cleared()
    raise TypeError(
        f"event: expected VllmBlockStored, VllmBlockRemoved or VllmAllBlocksCleared, got {event!r}"
    )


def encode_batch(batch: VllmEventBatch, release: str = "0.33.0") -> bytes:
    """The payload (frame 2) `release`'s publisher sends for `batch`, byte for byte.

    0.9.0 batches have no rank; other releases send `data_parallel_rank` as given (nil if None).
    """
    layout = _layout(release)
    events = [_to_release(layout, e) for e in batch.events]
    if layout.batch_has_rank:
        raw = layout.batch(batch.ts, events, batch.data_parallel_rank)
    else:
        raw = layout.batch(batch.ts, events)
    return _encoder.encode(raw)


# --- the ZMQ publisher ------------------------------------------------------------------------

_TCP = re.compile(r"^tcp://(?P<host>\[[^\]]*\]|[^:]*):(?P<port>\d+|\*)$")


def _bind_address(endpoint: str) -> str:
    """What to bind: `tcp://host:0` and `tcp://host:*` pick a free port."""
    match = _TCP.match(endpoint)
    if match is None:
        if endpoint.startswith(("ipc://", "inproc://")):
            return endpoint
        raise ValueError(
            f"endpoint: expected tcp://host:port, ipc:// or inproc://, got {endpoint!r}"
        )
    port = "*" if match["port"] in ("0", "*") else match["port"]
    return f"tcp://{match['host']}:{port}"


def _is_ipv6(address: str) -> bool:
    return address.startswith("tcp://[")


def _connect_address(bound: str) -> str:
    """The address a local subscriber connects to for what LAST_ENDPOINT reports."""
    match = _TCP.match(bound)
    if match is None:
        return bound
    host = match["host"]
    if host in ("0.0.0.0", "*", ""):
        host = "127.0.0.1"
    elif host in ("[::]", "[::0]"):
        host = "[::1]"
    return f"tcp://{host}:{match['port']}"


async def _bind_retrying(sock: zmq.Socket[Any], address: str, deadline_s: float = 10.0) -> None:
    # Rebinding the port a just-closed socket used can fail while libzmq's I/O thread still
    # holds it; retry briefly. This is a bind retry, not a synchronisation sleep.
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        try:
            sock.bind(address)
            return
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or loop.time() >= end:
                raise
        await asyncio.sleep(0.02)


async def _bind(sock: zmq.Socket[Any], address: str) -> tuple[str, str]:
    """Bind `sock` (closed again if that fails): its connect address, and `address` pinned to
    the port it got, so a restart rebinds the same one."""
    sock.setsockopt(zmq.IPV6, _is_ipv6(address))
    try:
        await _bind_retrying(sock, address)
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return _connect_address(bound), _pin_port(address, bound)


class ZmqEventPublisher:
    """A vLLM-compatible KV-event publisher: PUB for live batches, ROUTER for replay.

    Binds both sockets (as vLLM does for `tcp://*:P`); `endpoint` and `replay_endpoint` are the
    connect addresses after `start()`. Fault switches (`drop_next`, `pause`, `restart`,
    `stop_replay`) let the simulator and chaos tests reproduce what consumers must survive.
    With `curve` both sockets are CURVE servers holding that key pair (subscribers need its
    public key; without a ZAP handler in the context any client key is accepted).
    """

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:0",
        *,
        replay_endpoint: str | None = None,
        topic: str = "",
        release: str = "0.33.0",
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        context: zmq.asyncio.Context | None = None,
        curve: CurveKeyPair | None = None,
    ) -> None:
        self._layout = _layout(release)
        self._curve = curve
        self._bind_pub = _bind_address(endpoint)
        self._bind_replay = None if replay_endpoint is None else _bind_address(replay_endpoint)
        if buffer_steps < 1:
            raise ValueError(f"buffer_steps: expected >= 1, got {buffer_steps}")
        self.release = release
        self.topic = topic
        self._topic = topic.encode()
        self._buffer_steps = buffer_steps
        self._hwm = hwm
        self._own_context = context is None
        self._context = context if context is not None else zmq.asyncio.Context()
        self.endpoint: str = endpoint
        self.replay_endpoint: str | None = replay_endpoint
        self.next_seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._pub: zmq.Socket[Any] | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._router_task: asyncio.Task[None] | None = None
        self._drop = 0
        self._paused = False
        self._queued: deque[bytes] = deque()
        self._closed = False

    # -- lifecycle --

    async def start(self) -> None:
        """Bind the PUB socket (and the replay ROUTER with its serving task)."""
        if self._pub is not None:
            return
        await self._open_pub()
        if self._bind_replay is not None:
            await self._open_router()

    async def _open_pub(self) -> None:
        # A plain (blocking-API) socket: PUB never blocks with NOBLOCK, it drops at the HWM,
        # so publish() can stay synchronous like vLLM's publisher thread.
        pub: zmq.Socket[Any] = zmq.Socket(self._context, zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.set_hwm(self._hwm)
        if self._curve is not None:
            curve_server(pub, self._curve)
        self.endpoint, self._bind_pub = await _bind(pub, self._bind_pub)
        self._pub = pub

    async def _open_router(self) -> None:
        assert self._bind_replay is not None
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.SNDHWM, self._layout.replay_sndhwm(self._buffer_steps))
        if self._curve is not None:
            curve_server(router, self._curve)
        self.replay_endpoint, self._bind_replay = await _bind(router, self._bind_replay)
        self._router = router
        self._router_task = asyncio.create_task(self._serve_replay(router))

    def _close_pub(self) -> None:
        if self._pub is not None:
            self._pub.close(linger=0)
            self._pub = None

    async def _close_router(self) -> None:
        task, self._router_task = self._router_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._router is not None:
            self._router.close(linger=0)
            self._router = None

    async def close(self) -> None:
        """Close both sockets (and the context if this publisher created it)."""
        if self._closed:
            return
        self._closed = True
        await self._close_router()
        self._close_pub()
        if self._own_context:
            self._context.term()

    async def __aenter__(self) -> ZmqEventPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def restart(self) -> None:
        """Engine process restart: rebind both sockets on the same ports, seq back to 0.

        The replay buffer, queued batches and fault switches (pause, drop_next, a stopped
        replay ROUTER) are lost with the old process; no AllBlocksCleared is sent (vLLM sends
        none at startup).
        """
        await self._close_router()
        self._close_pub()
        self.next_seq = 0
        self._buffer.clear()
        self._queued.clear()
        self._drop = 0
        self._paused = False
        await self._open_pub()
        if self._bind_replay is not None:
            await self._open_router()

    async def stop_replay(self) -> None:
        """Close the replay ROUTER (requests then time out on the client side)."""
        await self._close_router()

    async def start_replay(self) -> None:
        """Rebind the replay ROUTER on its port (no-op without a replay endpoint)."""
        if self._router is None and self._bind_replay is not None:
            await self._open_router()

    # -- publishing --

    def publish(self, batch: VllmEventBatch) -> int:
        """Encode `batch` for this release and publish it; returns its seq."""
        return self.publish_payload(encode_batch(batch, self._layout.release))

    def publish_payload(self, payload: bytes) -> int:
        """Publish an already-encoded (or deliberately malformed) payload; returns its seq.

        While paused the payload is queued and the returned seq is the one it will get.
        """
        if self._pub is None:
            raise RuntimeError("ZmqEventPublisher: not started (call start()) or already closed")
        if self._paused:
            self._queued.append(payload)
            return self.next_seq + len(self._queued) - 1
        return self._send(payload)

    def _send(self, payload: bytes) -> int:
        assert self._pub is not None
        seq = self.next_seq
        self.next_seq += 1
        self._buffer.append((seq, payload))
        if self._drop > 0:
            self._drop -= 1
            return seq
        # PUB at its HWM drops (NOBLOCK never waits), exactly like vLLM's publisher.
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart(
                (self._topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK
            )
        return seq

    # -- fault switches --

    def drop_next(self, n: int) -> None:
        """The next `n` batches take a seq and enter the replay buffer but are not sent live."""
        self._drop += max(0, n)

    def pause(self) -> None:
        """Queue batches instead of sending them (seq assigned when sent)."""
        self._paused = True

    def resume(self) -> None:
        """Send every queued batch, in order, then publish normally again."""
        self._paused = False
        while self._queued and self._pub is not None:
            self._send(self._queued.popleft())

    @property
    def buffered(self) -> int:
        """How many batches the replay buffer holds."""
        return len(self._buffer)

    # -- replay --

    async def _serve_replay(self, router: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await router.recv_multipart()
            except zmq.ZMQError:
                return  # socket closed under us
            # vLLM answers only [identity, b"", start_seq]; anything else gets no reply at all.
            if len(frames) != 3 or frames[1] != b"":
                continue
            identity, start = frames[0], int.from_bytes(frames[2], "big")
            head = [identity, b""] + ([self._topic] if self._layout.replay_topic_frame else [])
            # Snapshot: the buffer may change while we await sends.
            for seq, payload in [item for item in self._buffer if item[0] >= start]:
                await self._router_send(router, [*head, seq.to_bytes(8, "big"), payload])
            end = [identity, b""] + ([b""] if self._layout.replay_topic_frame else [])
            await self._router_send(router, [*end, _END_SEQ, b""])

    @staticmethod
    async def _router_send(router: zmq.asyncio.Socket, frames: list[bytes]) -> None:
        # ROUTER drops (never blocks) at its SNDHWM or for a vanished peer, as in vLLM.
        with contextlib.suppress(zmq.Again, zmq.ZMQError):
            await router.send_multipart(frames, flags=zmq.NOBLOCK)


def _pin_port(bind_address: str, bound: str) -> str:
    """Keep the OS-chosen port so a restart rebinds the same one."""
    want, got = _TCP.match(bind_address), _TCP.match(bound)
    if want is None or got is None:
        return bind_address
    return f"tcp://{want['host']}:{got['port']}"
