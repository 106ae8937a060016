"""The gateway's corked transport (gateway/server.py): a response's writes in one step of the loop
leave in one write, in order, and nothing held is lost on close; and a real response through
the guarded protocol arrives in one write."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from kvroute.gateway.server import BackgroundServer, _CorkedTransport


class _Recorder(asyncio.Transport):
    """A transport that keeps what is written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0


async def _turn() -> None:
    """Let the loop run the callbacks queued so far (the flush is one)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_writes_in_one_step_leave_as_one_at_the_next_turn() -> None:
    inner = _Recorder()
    corked = _CorkedTransport(inner, asyncio.get_running_loop())
    corked.write(b"HTTP/1.1 200 OK\r\n\r\n")
    corked.write(b"")  # nothing to send: not a write
    corked.write(bytearray(b"body"))
    assert inner.writes == []
    assert corked.get_write_buffer_size() == len(b"HTTP/1.1 200 OK\r\n\r\nbody")
    await _turn()
    assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    corked.write(b"next")  # a later step: a write of its own
    await _turn()
    assert inner.writes[1:] == [b"next"]


async def test_close_sends_what_is_held_first_and_abort_drops_it() -> None:
    inner = _Recorder()
    corked = _CorkedTransport(inner, asyncio.get_running_loop())
    corked.writelines([b"a", b"b"])
    corked.close()
    assert inner.writes == [b"ab"] and inner.closed
    await _turn()  # the queued flush finds nothing more
    assert inner.writes == [b"ab"]

    inner = _Recorder()
    corked = _CorkedTransport(inner, asyncio.get_running_loop())
    corked.write(b"a")
    corked.abort()
    await _turn()
    assert inner.writes == [] and inner.aborted


async def test_held_writes_are_dropped_once_the_connection_is_closing() -> None:
    inner = _Recorder()
    corked = _CorkedTransport(inner, asyncio.get_running_loop())
    corked.write(b"a")
    inner.closed = True  # the peer went away meanwhile
    await _turn()
    assert inner.writes == []


@pytest.fixture
async def server(monkeypatch: pytest.MonkeyPatch) -> Any:
    async def complete(request: Request) -> Response:
        return PlainTextResponse("hello")

    async def streamed(request: Request) -> Response:
        release = request.app.state.release

        async def chunks() -> Any:
            await release.wait()
            yield b"late"

        return StreamingResponse(chunks(), media_type="text/plain")

    app = Starlette(routes=[Route("/complete", complete), Route("/streamed", streamed)])
    app.state.release = asyncio.Event()
    writes: list[bytes] = []
    original = _CorkedTransport._flush

    def recording(self: _CorkedTransport) -> None:
        if self._held:
            writes.append(b"".join(self._held))
        original(self)

    monkeypatch.setattr(_CorkedTransport, "_flush", recording)
    async with BackgroundServer(app) as background:
        yield background, app, writes


async def _exchange(url: str, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    return reader, writer


async def test_a_complete_response_leaves_in_one_write(server: Any) -> None:
    background, _, writes = server
    reader, writer = await _exchange(background.url, "/complete")
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
    finally:
        writer.close()
    assert len(writes) == 1 and writes[0].endswith(b"\r\n\r\nhello")


async def test_a_streamed_response_sends_its_head_before_its_first_chunk(server: Any) -> None:
    background, app, writes = server
    reader, writer = await _exchange(background.url, "/streamed")
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)  # while the app waits
        assert b"transfer-encoding: chunked" in head.lower()
        app.state.release.set()
        assert await asyncio.wait_for(reader.readuntil(b"late\r\n"), 10) == b"4\r\nlate\r\n"
    finally:
        writer.close()
    assert writes[0] == head
