"""A lean HTTP/1.1 client for plain-HTTP engines: kept-alive connections over asyncio streams,
one socket write per request (head and body together), a pool bounded over all engines."""

# httpx with httpcore and h11 spent about a quarter of the gateway's CPU on each proxied request
# (py-spy at 16 req/s: request and header objects, cookie and auth hooks, a pool scan that asks
# every connection's socket whether it is readable, h11's state machine, and two socket writes,
# headers then body; docs/design.md §8). This client does what the proxy, the remote tokenizer
# and the probes need and no more; `HttpxEngineClient` (httpx_client.py) uses it for `http://`
# engines and keeps httpx for `https://` ones and for injected transports (tests).
#
# Errors are named as httpx names them (`ConnectError`, `ConnectTimeout`, `ReadTimeout`,
# `WriteTimeout`, `PoolTimeout`, `RemoteProtocolError`, `ReadError`, `WriteError`) in the
# `HttpError` raised here; httpx_client.py maps them to EngineConnectError (a failed connect:
# the engine cannot have seen the request) or EngineResponseError (anything later).

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Final
from urllib.parse import urlsplit

__all__ = ["HttpError", "LeanPool", "LeanResponse", "Target", "target"]

_MAX_HEAD_BYTES: Final = 64 * 1024  # a response's status line and headers
_HEX_DIGITS: Final = b"0123456789abcdefABCDEF"
_MAX_INTERIM_ANSWERS: Final = 8  # 1xx answers before the final one (HTTP allows several)
_READ_SIZE: Final = 64 * 1024  # the most one body read asks for
_NO_BODY_STATUSES: Final = frozenset({204, 304})


class HttpError(Exception):
    """A failed exchange; `kind` is httpx's name for the same failure (ConnectError, ...)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind

    @property
    def connect_failure(self) -> bool:
        """No connection was made: the server cannot have seen the request."""
        return self.kind in ("ConnectError", "ConnectTimeout")


@dataclass(frozen=True, slots=True)
class Target:
    """Where a base URL points: its connection key and what goes into each request head."""

    host: str
    port: int
    prefix: str  # the base URL's path, without a trailing slash
    host_header: bytes


@lru_cache(maxsize=1024)
def target(base_url: str) -> Target | None:
    """The plain-HTTP target of `base_url`; None for any other scheme (https: httpx's)."""
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        return None
    try:
        port = parts.port or 80
    except ValueError:
        return None
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if parts.port is None else f"{shown}:{port}"
    return Target(host, port, parts.path.rstrip("/"), host_header.encode("ascii", "replace"))


def _detail(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Connection:
    __slots__ = ("expiry", "key", "reader", "writer")

    def __init__(
        self, key: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.key = key
        self.reader = reader
        self.writer = writer
        self.expiry: asyncio.TimerHandle | None = None

    def usable(self) -> bool:
        """Still open at both ends, with no stray bytes waiting (the server said nothing)."""
        reader = self.reader
        return not (reader.at_eof() or self.writer.is_closing() or len(reader._buffer))  # type: ignore[attr-defined]

    def close(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        self.writer.close()  # the transport closes; no need to wait for it


def _head_bytes(
    method: str, target: Target, path: str, headers: Mapping[str, str], body: bytes | None
) -> bytes:
    lines = [f"{method} {target.prefix}{path} HTTP/1.1"]
    for name, value in headers.items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"content-length: {len(body)}")
    text = "\r\n".join(lines)
    breaks = len(lines) - 1
    if text.count("\n") != breaks or text.count("\r") != breaks or "\0" in text:
        raise HttpError("LocalProtocolError", "a header holds a line break or NUL")
    try:
        head = text.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise HttpError("LocalProtocolError", f"a header is not latin-1: {exc}") from exc
    return b"%s\r\nhost: %s\r\n\r\n" % (head, target.host_header)


class LeanPool:
    """Keep-alive connections to plain-HTTP servers. At most `max_connections` requests run at
    once over all servers (None: no limit); a request waits for a place up to `pool_timeout_s`
    (PoolTimeout), and no more connections than that stay open (the oldest idle one is closed
    to make room). A connect takes at most `connect_timeout_s`, each read (and each send) at most
    `read_timeout_s`. An idle connection is closed after `keep_alive_s`."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_connections: int | None,
        keep_alive_s: float,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._max = max_connections
        self._keep_alive_s = keep_alive_s
        self._places = asyncio.Semaphore(max_connections) if max_connections else None
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._closed = False

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def aclose(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()

    async def request(
        self,
        method: str,
        target: Target,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
    ) -> LeanResponse:
        """Send the request and return once the status and headers arrived; the body is read
        from the response, which must be closed (`aclose`). Cancelled, the request is abandoned
        and its connection closed."""
        if self._closed:
            raise HttpError("PoolClosed", "the client is closed")
        head = _head_bytes(method, target, path, headers, body)
        data = head if not body else head + body
        places = self._places
        if places is not None:
            try:
                async with asyncio.timeout(self.read_timeout_s):
                    await places.acquire()
            except TimeoutError:
                raise HttpError(
                    "PoolTimeout", f"no connection free within {self.read_timeout_s} s"
                ) from None
        conn: _Connection | None = None
        try:
            conn = self._take_idle((target.host, target.port))
            if conn is None:
                conn = await self._connect(target)
            try:
                conn.writer.write(data)
                if conn.writer.transport.get_write_buffer_size():
                    async with asyncio.timeout(self.read_timeout_s):
                        await conn.writer.drain()
            except TimeoutError:
                raise HttpError(
                    "WriteTimeout", f"not sent within {self.read_timeout_s} s"
                ) from None
            except OSError as exc:
                raise HttpError("WriteError", _detail(exc)) from exc
            response = await self._read_head(conn, method)
        except BaseException:
            if conn is not None:
                self._discard(conn)
            if places is not None:
                places.release()
            raise
        return response

    # --- connections

    def _take_idle(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.expiry is not None:
                conn.expiry.cancel()
                conn.expiry = None
            if conn.usable():
                return conn
            self._discard(conn)
        return None

    async def _connect(self, target: Target) -> _Connection:
        if self._max is not None and len(self._open) >= self._max:
            self._close_oldest_idle()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    target.host, target.port, limit=_MAX_HEAD_BYTES
                )
        except TimeoutError:
            raise HttpError(
                "ConnectTimeout", f"no connection within {self.connect_timeout_s} s"
            ) from None
        except OSError as exc:
            raise HttpError("ConnectError", _detail(exc)) from exc
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio and uvloop set it on TCP sockets already; a request must never wait for
            # a delayed ACK (docs/design.md §8, "The router's own latency").
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection((target.host, target.port), reader, writer)
        self._open.add(conn)
        return conn

    def _close_oldest_idle(self) -> None:
        for idle in self._idle.values():
            if idle:
                self._discard(idle.pop(0))
                return

    def _discard(self, conn: _Connection) -> None:
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        conn.close()

    def _release(self, conn: _Connection, reuse: bool) -> None:
        """The response is done with `conn`: back to the idle list when `reuse`, else closed;
        either way its place is free again."""
        if reuse and not self._closed and conn.usable():
            self._idle.setdefault(conn.key, []).append(conn)
            conn.expiry = asyncio.get_running_loop().call_later(
                self._keep_alive_s, self._expire, conn
            )
        else:
            self._discard(conn)
        if self._places is not None:
            self._places.release()

    def _expire(self, conn: _Connection) -> None:
        conn.expiry = None
        self._discard(conn)

    # --- reading

    async def _read_head(self, conn: _Connection, method: str) -> LeanResponse:
        reader = conn.reader
        for _interim in range(_MAX_INTERIM_ANSWERS + 1):
            try:
                async with asyncio.timeout(self.read_timeout_s):
                    raw = await reader.readuntil(b"\r\n\r\n")
            except TimeoutError:
                raise HttpError(
                    "ReadTimeout", f"no answer within {self.read_timeout_s} s"
                ) from None
            except asyncio.IncompleteReadError:
                raise HttpError(
                    "RemoteProtocolError", "Server disconnected without sending a response."
                ) from None
            except asyncio.LimitOverrunError:
                raise HttpError(
                    "RemoteProtocolError", f"response head over {_MAX_HEAD_BYTES} bytes"
                ) from None
            except OSError as exc:
                raise HttpError("ReadError", _detail(exc)) from exc
            status, version, headers = _parse_head(raw)
            if 100 <= status < 200 and status != 101:
                continue  # an interim answer (100 Continue): the real one follows
            break
        else:  # an engine answering with interim answers only would hold the request forever
            raise HttpError(
                "RemoteProtocolError", f"over {_MAX_INTERIM_ANSWERS} interim (1xx) answers"
            )
        framing, length, reuse = _framing(method, status, version, headers)
        return LeanResponse(self, conn, status, headers, framing, length, reuse)


def _parse_head(raw: bytes) -> tuple[int, str, dict[str, str]]:
    """Status, HTTP version and headers (lower-case names; repeated ones joined with ", ")."""
    lines = raw[:-4].decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if (
        not version.startswith("HTTP/1.")
        or len(code) != 3
        or not (code.isascii() and code.isdigit())
    ):
        raise HttpError("RemoteProtocolError", f"malformed status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError("RemoteProtocolError", f"malformed header line {line[:80]!r}")
        name = name.lower()
        value = value.strip(" \t")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return int(code), version, headers


def _framing(
    method: str, status: int, version: str, headers: dict[str, str]
) -> tuple[str, int, bool]:
    """How the body is delimited ("none", "length", "chunked", "eof"), its length for "length",
    and whether the connection can carry another request after it."""
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    reuse = version == "HTTP/1.1" and "close" not in tokens
    if method == "HEAD" or status in _NO_BODY_STATUSES or status < 200:
        return "none", 0, reuse
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if coding.rsplit(",", 1)[-1].strip().lower() != "chunked":
            return "eof", 0, False
        return "chunked", 0, reuse
    given = headers.get("content-length")
    if given is None:
        return "eof", 0, False
    values = {v.strip() for v in given.split(",")}
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if len(values) != 1 or not ((value := values.pop()).isascii() and value.isdigit()):
        raise HttpError("RemoteProtocolError", f"malformed content-length {given[:40]!r}")
    return "length", int(value), reuse


class LeanResponse:
    """An answer whose status and headers arrived; `aiter_raw` reads the body as it comes (with
    chunked framing removed, content-encoding left as sent), `read` all of it. `aclose` hands
    the connection back to the pool when the body was read to its end, else closes it."""

    __slots__ = (
        "_chunk_left",
        "_conn",
        "_done",
        "_framing",
        "_left",
        "_pool",
        "_released",
        "_reuse",
        "headers",
        "status_code",
    )

    def __init__(
        self,
        pool: LeanPool,
        conn: _Connection,
        status: int,
        headers: dict[str, str],
        framing: str,
        length: int,
        reuse: bool,
    ) -> None:
        self._pool = pool
        self._conn = conn
        self.status_code = status
        self.headers: Mapping[str, str] = headers
        self._framing = framing
        self._left = length  # "length": bytes still to come
        self._chunk_left = 0  # "chunked": bytes of the current chunk still to come
        self._reuse = reuse
        self._done = framing == "none" or (framing == "length" and length == 0)
        self._released = False

    def aiter_raw(self) -> AsyncIterator[bytes]:
        return self

    def __aiter__(self) -> LeanResponse:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        try:
            async with asyncio.timeout(self._pool.read_timeout_s):
                chunk = await self._next()
        except TimeoutError:
            self._fail()
            raise HttpError(
                "ReadTimeout", f"no more of the body within {self._pool.read_timeout_s} s"
            ) from None
        except asyncio.IncompleteReadError:
            self._fail()
            raise HttpError(
                "RemoteProtocolError",
                "peer closed connection without sending complete message body",
            ) from None
        except asyncio.LimitOverrunError:
            self._fail()
            raise HttpError("RemoteProtocolError", "a chunk size line over 64 KiB") from None
        except OSError as exc:
            self._fail()
            raise HttpError("ReadError", _detail(exc)) from exc
        except BaseException:
            self._fail()
            raise
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([chunk async for chunk in self])

    async def _next(self) -> bytes:
        reader = self._conn.reader
        if self._framing == "length":
            chunk = await reader.read(min(self._left, _READ_SIZE))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", self._left)
            self._left -= len(chunk)
            self._done = self._left == 0
            return chunk
        if self._framing == "eof":
            chunk = await reader.read(_READ_SIZE)
            self._done = not chunk
            return chunk
        if self._chunk_left == 0:  # chunked: the next chunk's size line
            line = await reader.readuntil(b"\r\n")
            size_text = line[:-2].split(b";", 1)[0].strip()
            # Hex digits only: int(x, 16) also takes "-1", "+2", "0x2" and "1_0", and a
            # negative size would read the connection to its end.
            if not 0 < len(size_text) <= 16 or size_text.strip(_HEX_DIGITS):
                raise HttpError("RemoteProtocolError", f"malformed chunk size {line[:40]!r}")
            size = int(size_text, 16)
            if size == 0:  # the last chunk; then trailers, up to a blank line
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                self._done = True
                return b""
            self._chunk_left = size
        chunk = await reader.read(min(self._chunk_left, _READ_SIZE))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", self._chunk_left)
        self._chunk_left -= len(chunk)
        if self._chunk_left == 0 and await reader.readexactly(2) != b"\r\n":
            raise HttpError("RemoteProtocolError", "a chunk does not end with CRLF")
        return chunk

    def _fail(self) -> None:
        self._done = True
        self._reuse = False

    async def aclose(self) -> None:
        if self._released:
            return
        self._released = True
        self._pool._release(self._conn, self._reuse and self._done)
