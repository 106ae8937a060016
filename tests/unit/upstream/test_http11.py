"""The lean HTTP/1.1 client (upstream/http11.py) against raw socket servers on 127.0.0.1: body
framings, keep-alive reuse and expiry, the pool bound, one write per request, bad answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from kvroute.upstream.http11 import HttpError, LeanPool, target
from tests.polling import eventually

Answer = Callable[[str, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class _Server:
    """A raw HTTP/1.1 server: `answer(path, reader, writer)` writes the answer to each request
    and says whether the connection stays open for another. Counts connections and keeps each
    request's head."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.heads: list[str] = []
        self.bodies: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> _Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                except asyncio.IncompleteReadError:
                    return
                self.heads.append(head)
                length = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                self.bodies.append(await reader.readexactly(length))
                if not await self.answer(head.split(" ", 2)[1], reader, writer):
                    return
                await writer.drain()
        finally:
            writer.close()


def _pool(**kw: float | int | None) -> LeanPool:
    options: dict[str, float | int | None] = {
        "connect_timeout_s": 5.0,
        "read_timeout_s": 5.0,
        "max_connections": 10,
        "keep_alive_s": 5.0,
        **kw,
    }
    return LeanPool(**options)  # type: ignore[arg-type]


@pytest.fixture
async def pool() -> AsyncIterator[LeanPool]:
    p = _pool()
    yield p
    await p.aclose()


async def _ok(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    body = path.encode()
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    return True


async def _get(pool: LeanPool, url: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    where = target(url)
    assert where is not None
    response = await pool.request("POST" if body else "GET", where, path, {}, body)
    try:
        return response.status_code, await response.read()
    finally:
        await response.aclose()


def test_targets_are_plain_http_base_urls_with_their_path() -> None:
    where = target("http://127.0.0.1:8000/prefix/")
    assert where is not None
    assert (where.host, where.port, where.prefix, where.host_header) == (
        "127.0.0.1",
        8000,
        "/prefix",
        b"127.0.0.1:8000",
    )
    v6 = target("http://[::1]/")
    assert v6 is not None and (v6.port, v6.host_header) == (80, b"[::1]")
    assert target("https://engine:8000") is None  # TLS goes by httpx


async def test_the_bodies_of_every_framing_arrive_whole(pool: LeanPool) -> None:
    async def answer(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if path == "/chunked":  # a chunk extension and a trailer, as RFC 9112 §7.1 allows
            writer.write(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n"
            )
            return True
        if path == "/eof":  # neither length nor chunks: the body ends with the connection
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
            return False
        if path == "/continue":  # an interim answer first
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
            return True
        return await _ok(path, reader, writer)

    async with _Server(answer) as server:
        assert await _get(pool, server.url, "/chunked") == (200, b"hello world")
        assert await _get(pool, server.url, "/length") == (200, b"/length")
        assert await _get(pool, server.url, "/continue") == (204, b"")
        assert await _get(pool, server.url, "/eof") == (200, b"until the end")
        assert server.connections == 1  # kept alive until the answer that ended it
        assert await _get(pool, server.url, "/after") == (200, b"/after")
        assert server.connections == 2


async def test_a_request_goes_out_in_one_write_with_its_host_and_length(
    pool: LeanPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    original = asyncio.StreamWriter.write

    def counting(self: asyncio.StreamWriter, data: bytes) -> None:
        if not bytes(data).startswith(b"HTTP/"):  # the server's answers go by it too
            writes.append(bytes(data))
        original(self, data)

    async with _Server(_ok) as server:
        await _get(pool, server.url, "/warm")  # the connection exists (the server writes too)
        monkeypatch.setattr(asyncio.StreamWriter, "write", counting)
        where = target(server.url + "/base")
        assert where is not None
        response = await pool.request(
            "POST", where, "/v1/completions", {"content-type": "application/json"}, b'{"a":1}'
        )
        await response.aclose()
    assert len(writes) == 1  # head and body together
    head, _, body = writes[0].partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"POST /base/v1/completions HTTP/1.1"
    assert b"content-length: 7" in head and b"host: 127.0.0.1:" in head
    assert body == b'{"a":1}'


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(
    pool: LeanPool,
) -> None:
    async with _Server(_ok) as server:
        where = target(server.url)
        assert where is not None
        for value in ("a\r\nx-injected: 1", "a\nb", "a\rb"):
            with pytest.raises(HttpError, match="LocalProtocolError"):
                await pool.request("GET", where, "/", {"x-note": value})
        assert server.connections == 0


async def test_connection_close_and_http_1_0_answers_are_not_reused(pool: LeanPool) -> None:
    async def answer(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if path == "/close":
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n")
        return True  # the server would go on: the client must not

    async with _Server(answer) as server:
        for path in ("/close", "/old", "/close"):
            assert await _get(pool, server.url, path) == (200, b"")
        assert server.connections == 3
        assert pool.open_connections == 0


async def test_an_idle_connection_is_closed_after_keep_alive() -> None:
    pool = _pool(keep_alive_s=0.05)
    try:
        async with _Server(_ok) as server:
            await _get(pool, server.url, "/")
            await eventually(lambda: pool.open_connections == 0, "the idle connection closed")
            await _get(pool, server.url, "/")
            assert server.connections == 2
    finally:
        await pool.aclose()


async def test_a_connection_the_server_closed_is_not_reused(pool: LeanPool) -> None:
    async def answer(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await _ok(path, reader, writer)
        return False  # closes after answering, without saying so

    async with _Server(answer) as server:
        where = target(server.url)
        assert where is not None
        await _get(pool, server.url, "/")
        idle = pool._idle[(where.host, where.port)]
        await eventually(lambda: not idle or not idle[0].usable(), "the close was seen")
        assert await _get(pool, server.url, "/again") == (200, b"/again")
        assert server.connections == 2


async def test_the_pool_bounds_requests_and_open_connections_over_all_servers() -> None:
    async def partly(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if path == "/hold":  # headers and half the body: the response holds its place
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234")
            return True
        return await _ok(path, reader, writer)

    pool = _pool(max_connections=1, read_timeout_s=0.2)
    try:
        async with _Server(partly) as a, _Server(_ok) as b:
            where = target(a.url)
            assert where is not None
            holding = await pool.request("GET", where, "/hold", {})
            with pytest.raises(HttpError, match="PoolTimeout"):
                await _get(pool, b.url, "/")  # no place free within the pool timeout
            await holding.aclose()  # unread rest: its connection is closed, its place freed
            assert pool.open_connections == 0
            assert await _get(pool, a.url, "/ok") == (200, b"/ok")
            assert pool.open_connections == 1  # a's, idle
            assert await _get(pool, b.url, "/") == (200, b"/")
            assert pool.open_connections == 1  # a's idle one made room for b's
            assert (a.connections, b.connections) == (2, 1)
    finally:
        await pool.aclose()


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (b"SMTP ready\r\n\r\n", "RemoteProtocolError: malformed status line"),
        (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "RemoteProtocolError: malformed header"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n", "malformed content-length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n", "malformed content-length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: -5\r\n\r\n", "malformed content-length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: \xb2\r\n\r\n", "malformed content-length"),
        (b"", "RemoteProtocolError: Server disconnected"),
        (b"HTTP/1.1 \xb200 OK\r\n\r\n", "RemoteProtocolError: malformed status line"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 9, "RemoteProtocolError: over 8 interim"),
    ],
)
async def test_malformed_answers_are_protocol_errors(
    pool: LeanPool, answer: bytes, kind: str
) -> None:
    async def bad(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer)
        return False

    async with _Server(bad) as server:
        with pytest.raises(HttpError, match=kind):
            await _get(pool, server.url, "/")
        assert pool.open_connections == 0


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nab\r\n0\r\n\r\n",
        b"2\r\nabXY0\r\n\r\n",
        b"5\r\nab",
        b"-1\r\n" + b"x" * 4096,  # int(..., 16) would take it; read(-1) reads to the end
        b"+2\r\nab\r\n0\r\n\r\n",
        b"0x2\r\nab\r\n0\r\n\r\n",
        b"1_0\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n",
        b"\r\nab\r\n0\r\n\r\n",
        b"1" * 17 + b"\r\nab",
    ],
    ids=[
        "bad-size",
        "bad-chunk-end",
        "cut",
        "negative",
        "plus",
        "0x",
        "underscore",
        "empty",
        "long",
    ],
)
async def test_a_broken_chunked_body_is_a_protocol_error_and_closes_the_connection(
    pool: LeanPool, body: bytes
) -> None:
    async def bad(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + body)
        return False

    async with _Server(bad) as server:
        with pytest.raises(HttpError, match="RemoteProtocolError"):
            await _get(pool, server.url, "/")
        assert pool.open_connections == 0


async def test_a_response_closed_before_its_end_closes_its_connection(pool: LeanPool) -> None:
    async def big(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234")
        return True

    async with _Server(big) as server:
        where = target(server.url)
        assert where is not None
        response = await pool.request("GET", where, "/", {})
        assert await response.__anext__() == b"01234"
        await response.aclose()
        await response.aclose()  # idempotent
        assert pool.open_connections == 0  # the rest would have been read as the next answer


async def test_a_closed_pool_refuses_requests(pool: LeanPool) -> None:
    await pool.aclose()
    where = target("http://127.0.0.1:9")
    assert where is not None
    with pytest.raises(HttpError, match="PoolClosed"):
        await pool.request("GET", where, "/", {})
