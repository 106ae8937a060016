"""The native receive loop (events/_recv.c) on real sockets: what it hands up for every message
shape, its batch limit and return codes, and the choice between it and pyzmq's calls."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from kvroute.errors import ConfigError
from kvroute.events import native_receive
from kvroute.events.native_receive import Drain, native_drain, receive_error

pytestmark = pytest.mark.skipif(
    receive_error() is not None, reason=f"native receive loop unavailable: {receive_error()}"
)


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
    """A PUSH → PULL pair over 127.0.0.1 (frames arrive exactly as sent, no subscription)."""
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    pull = ctx.socket(zmq.PULL)
    for sock in (push, pull):
        sock.setsockopt(zmq.LINGER, 0)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    yield push, pull
    push.close()
    pull.close()
    ctx.term()


def _drain() -> Drain:
    drain = native_drain("native")
    assert drain is not None
    return drain


def _wait_readable(sock: zmq.Socket[Any]) -> None:
    assert sock.poll(10_000, zmq.POLLIN), f"nothing arrived within 10 s ({sock.get(zmq.EVENTS)})"


def test_every_message_shape(pair: tuple[zmq.Socket[Any], zmq.Socket[Any]]) -> None:
    push, pull = pair
    drain = _drain()
    big = bytes(range(256)) * 4096  # 1 MiB
    sent: list[tuple[list[bytes], tuple[int, bytes] | None]] = [
        ([b"kv", (7).to_bytes(8, "big"), b"payload"], (7, b"payload")),
        ([b"", (2**64 - 1).to_bytes(8, "big"), b""], (2**64 - 1, b"")),
        ([b"kv"], None),  # one frame
        ([b"kv", (8).to_bytes(8, "big")], None),  # two frames
        ([b"kv", (9).to_bytes(8, "big"), b"p", b"extra"], None),  # four frames
        ([b"kv", (9).to_bytes(8, "big"), b"p", b"a", b"b", b"c"], None),  # six frames
        ([b"kv", b"\x00" * 7, b"p"], None),  # a 7-byte seq
        ([b"kv", b"\x00" * 9, b"p"], None),  # a 9-byte seq
        ([b"kv", (10).to_bytes(8, "big"), big], (10, big)),
    ]
    for frames, _ in sent:
        push.send_multipart(frames)
    push.send_multipart([b"end", (11).to_bytes(8, "big"), b"last"])
    out: list[Any] = []
    while len(out) < len(sent) + 1:
        _wait_readable(pull)
        status = drain(pull.underlying, 100, out)
        assert status in (0, 1)
    assert out == [expected for _, expected in sent] + [(11, b"last")]
    assert drain(pull.underlying, 100, out) == 0  # empty: EAGAIN
    assert len(out) == len(sent) + 1


def test_the_limit_is_kept_and_reported(pair: tuple[zmq.Socket[Any], zmq.Socket[Any]]) -> None:
    push, pull = pair
    drain = _drain()
    for seq in range(10):
        push.send_multipart([b"kv", seq.to_bytes(8, "big"), b"x"])
    _wait_readable(pull)
    out: list[Any] = []
    while len(out) < 10:  # the I/O thread may still be handing some over: no sleep, just retry
        before = len(out)
        status = drain(pull.underlying, 3, out)
        assert len(out) - before <= 3
        assert status == (1 if len(out) - before == 3 else 0)
        if status == 0 and len(out) < 10:
            _wait_readable(pull)
    assert [item[0] for item in out] == list(range(10))


def test_a_libzmq_failure_is_returned_as_minus_errno(
    pair: tuple[zmq.Socket[Any], zmq.Socket[Any]],
) -> None:
    push, _ = pair
    out: list[Any] = []
    assert _drain()(push.underlying, 10, out) == -errno.ENOTSUP  # a PUSH socket cannot receive
    assert out == []


def test_python_and_an_unavailable_native_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    assert native_drain("python") is None
    native_receive._load.cache_clear()
    try:
        monkeypatch.setattr(
            native_receive, "_load", lambda: (None, "the extension is not built (test)")
        )
        with pytest.raises(ConfigError, match="KVROUTE_RECEIVE_IMPL=native, but"):
            native_drain("native")
        assert native_drain("auto") is None
    finally:
        monkeypatch.undo()
        native_receive._load.cache_clear()
    assert native_drain("auto") is not None


@pytest.mark.skipif(native_receive.pause_timer() is None, reason="no timerfd (not Linux)")
def test_the_pause_timer_fires_once_near_its_time_and_ack_clears_it() -> None:
    import select
    import time

    timer = native_receive.pause_timer()
    assert timer is not None
    poller = select.epoll()
    try:
        poller.register(timer.fd, select.EPOLLIN)
        assert poller.poll(0) == [] and timer.ack() == 0  # not armed: silent
        for window in (0.0002, 0.002):
            started = time.perf_counter()
            timer.arm(window)
            assert poller.poll(5.0) == [(timer.fd, select.EPOLLIN)]
            # Never early; late only by scheduling (not asyncio's whole milliseconds).
            assert time.perf_counter() - started >= window
            assert timer.ack() == 1 and timer.ack() == 0
            assert poller.poll(0) == []  # acked: the descriptor is quiet again
        timer.arm(0)  # "now" still fires (a zero would disarm a timerfd)
        assert poller.poll(5.0) == [(timer.fd, select.EPOLLIN)] and timer.ack() == 1
    finally:
        poller.close()
        timer.close()
