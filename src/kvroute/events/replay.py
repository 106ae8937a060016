"""Ask an engine's replay ROUTER for the batches it still buffers from a given seq on, in every
release's replay layout (2 or 3 data frames); never hangs, raises only kvroute errors."""

from __future__ import annotations

import asyncio
from typing import Final

import msgspec
import zmq.asyncio

from kvroute.errors import EngineError, WireError
from kvroute.events.curve import CurveClientKeys, curve_client

__all__ = ["END_SEQ", "ReplayResult", "parse_replay_frames", "request_replay"]

END_SEQ: Final = b"\xff" * 8
"""The seq frame of the end-of-replay marker (vLLM: `(-1).to_bytes(8, "big", signed=True)`)."""


class ReplayResult(msgspec.Struct, frozen=True):
    """Replayed `(seq, payload)` pairs, oldest first; `complete` when the end marker arrived."""

    batches: list[tuple[int, bytes]]
    complete: bool
    truncated: bool = False  # the reply passed `max_batches` or `max_bytes`: not read further


def parse_replay_frames(frames: list[bytes]) -> tuple[int, bytes] | None:
    """One reply message as a DEALER sees it → `(seq, payload)`, or None for the end marker.

    0.9.0–0.25.x send `[b"", seq8, payload]`, 0.26.0+ `[b"", topic, seq8, payload]`
    (pinned by test_replay_frames_fixture); a REQ-style reply without the delimiter is accepted.
    """
    data = frames[1:] if frames and frames[0] == b"" and len(frames) > 2 else frames
    if len(data) not in (2, 3):
        raise WireError(
            "replay reply: expected 2 or 3 data frames after the delimiter, "
            f"got {len(frames)} frames"
        )
    seq_frame, payload = data[-2], data[-1]
    if seq_frame == END_SEQ or not payload:
        return None
    if len(seq_frame) != 8:
        raise WireError(f"replay reply seq: expected 8 bytes, got {len(seq_frame)}")
    return int.from_bytes(seq_frame, "big"), payload


async def request_replay(
    context: zmq.asyncio.Context,
    endpoint: str,
    start_seq: int,
    *,
    timeout_s: float = 2.0,
    max_message_bytes: int = 0,
    max_batches: int = 0,
    max_bytes: int = 0,
    curve: CurveClientKeys | None = None,
) -> ReplayResult:
    """Replay every buffered batch with seq >= `start_seq` from the ROUTER at `endpoint`.

    Uses a DEALER (a REQ socket would receive only the first reply). `timeout_s` bounds the
    whole replay: on expiry the batches so far come back with `complete=False`. A reply larger
    than `max_message_bytes` (0: no limit) is refused by libzmq before it is allocated, which
    closes the connection: the replay then times out. A malformed reply raises `WireError`; a
    socket failure (bad endpoint) raises `EngineError`. Past `max_batches` batches or
    `max_bytes` payload bytes (0: no limit) the reply is not read further (`truncated`), so a
    replay server that never sends its end marker costs a bounded amount. With `curve` the
    DEALER is a CURVE client of that server (a failed handshake looks like a silent server).
    """
    if not 0 <= start_seq < 2**64:
        raise WireError(f"replay start_seq: expected 0 <= seq < 2**64, got {start_seq}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        sock = context.socket(zmq.DEALER)
    except zmq.ZMQError as exc:
        raise EngineError(f"replay {endpoint}: cannot open a DEALER socket ({exc})") from exc
    batches: list[tuple[int, bytes]] = []
    size = 0
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)  # never drop replies on our side
        if max_message_bytes > 0:
            sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        sock.setsockopt(zmq.IPV6, 1)  # dual-stack: IPv6 endpoints work, IPv4 ones still do
        if curve is not None:
            curve_client(sock, curve)
        sock.connect(endpoint)
        try:
            await asyncio.wait_for(
                sock.send_multipart([b"", start_seq.to_bytes(8, "big")]), timeout_s
            )
        except TimeoutError:
            return ReplayResult(batches, complete=False)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return ReplayResult(batches, complete=False)
            events = await sock.poll(timeout=max(1, int(remaining * 1000)))
            if not events:
                return ReplayResult(batches, complete=False)
            frames = await sock.recv_multipart(flags=zmq.NOBLOCK)
            item = parse_replay_frames(frames)
            if item is None:
                return ReplayResult(batches, complete=True)
            batches.append(item)
            size += len(item[1])
            if (max_batches and len(batches) >= max_batches) or (max_bytes and size >= max_bytes):
                return ReplayResult(batches, complete=False, truncated=True)
    except zmq.ZMQError as exc:
        raise EngineError(f"replay {endpoint}: {exc}") from exc
    finally:
        sock.close(linger=0)
