"""Run the gateway under uvicorn: `serve_forever` for `kvroute serve`, `BackgroundServer`
(in-process, port 0) for the demo and tests."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from kvroute.errors import ConfigError, GatewayHTTPError
from kvroute.gateway.openai_errors import error_body

if sys.platform != "win32":  # FIONREAD: the bytes a socket holds unread
    from fcntl import ioctl
    from termios import FIONREAD

__all__ = ["BackgroundServer", "ServerOptions", "listen", "serve_forever"]

log = logging.getLogger("kvroute.gateway")

_BACKLOG = 2048  # uvicorn's default (Config.backlog)


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """The HTTP server's own limits and TLS (README "Limits"; settings of the same names)."""

    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    max_connections: int | None = None  # beyond it, new connections get a 503 (None: none)
    keep_alive_timeout_s: float = 120.0  # an idle kept-alive connection is closed after it
    header_timeout_s: float | None = None  # to send a request's headers (None: no deadline)
    max_header_bytes: int = 16 * 1024  # request line plus headers
    on_header_timeout: Callable[[], None] | None = None  # counts each close (Metrics)
    # uvloop where installed: accepting and closing 2,000 connections at once holds its loop
    # ~20 ms, asyncio's ~180 ms (measured; README "Limits").
    event_loop: str = "auto"


# Of a body the gateway has already answered (a 413, a 401), at most this much is read and
# thrown away so the connection can be reused and the client, still sending, reads the answer;
# past it the connection is closed (nginx's lingering close, bounded in bytes).
_MAX_DISCARD_BYTES = 1 << 20
_REFUSAL_READ_S = 10.0  # to read a refused request without a header_timeout_s


def _unread_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes of the connection that arrived but the loop has not read yet (0 when unknown)."""
    if sys.platform == "win32":
        return 0
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        count: int = struct.unpack("i", ioctl(sock.fileno(), FIONREAD, b"\0\0\0\0"))[0]
    except (OSError, ValueError):  # closed meanwhile
        return 0
    return count


def _refusal(limit: int, read_timeout_s: float) -> ASGIApp:
    """The app of a connection past `max_connections`: it reads the request (a body of at most
    _MAX_DISCARD_BYTES, for at most `read_timeout_s`), then answers a 503 with an OpenAI-shaped
    body and closes the connection. Closing before the request is read would reset it, and the
    client would see a dropped connection instead of the 503."""
    error = GatewayHTTPError(
        503,
        f"too many connections: the gateway serves at most {limit} at once; retry",
        type="service_unavailable_error",
        code="too_many_connections",
    )
    body = json.dumps(error_body(error)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]

    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        read = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(read_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client went away
                    read += len(message.get("body", b""))
                    if not message.get("more_body", False) or read > _MAX_DISCARD_BYTES:
                        break
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return refuse


class _Admission:
    """The connections served under `max_connections`; a new one past it gets `app`, the
    refusal. Refusals are logged: the first, then a count at most every `log_every_s`."""

    def __init__(self, limit: int, read_timeout_s: float, log_every_s: float = 10.0) -> None:
        self.app = _refusal(limit, read_timeout_s)
        self._limit = limit
        self._served: set[object] = set()
        self._log_every_s = log_every_s
        self._refused = 0
        self._logged_at: float | None = None

    def admit(self, connection: object, now: float) -> bool:
        if len(self._served) < self._limit:
            self._served.add(connection)
            return True
        self._refused += 1
        if self._logged_at is None or now - self._logged_at >= self._log_every_s:
            log.warning(
                "connections refused with a 503: max_connections reached",
                extra={"max_connections": self._limit, "refused": self._refused},
            )
            self._refused, self._logged_at = 0, now
        return False

    def release(self, connection: object) -> None:
        self._served.discard(connection)


class _CorkedTransport(asyncio.Transport):
    """A connection's transport whose writes made in one step of the loop go out as one: the
    first write is held and sent, joined with any that follow it, by a callback at the loop's
    next turn. uvicorn writes a response's head, body and end separately (two or three
    syscalls and TCP segments, each waking the client); a complete response now leaves in one.
    A streamed response's head still goes out as soon as the app awaits its next chunk. Every
    write of the connection (the server's own error answers too) passes here, so their order
    holds; `close` and `abort` send what is held first."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._held is None:
            self._held = [bytes(data)]
            self._loop.call_soon(self._flush)
        else:
            self._held.append(bytes(data))

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_write_buffer_size(self) -> int:
        held = sum(len(d) for d in self._held) if self._held else 0
        return held + self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


def _too_large(limit: int) -> bytes:
    """A complete 431 with an OpenAI-shaped body, written raw: h11 has seen no request yet."""
    error = GatewayHTTPError(431, f"request headers: expected at most {limit} bytes")
    body = json.dumps(error_body(error)).encode()
    return (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )


def _guarded_h11(options: ServerOptions) -> type[H11Protocol]:
    """uvicorn's h11 protocol, plus a deadline for each request's headers: it starts when the
    connection opens or when a byte of the next request arrives, and is not pushed back by
    more bytes, so a client trickling headers (slowloris) or sending nothing is closed. And a
    size limit on them: h11's own applies only to headers split over several reads.

    An idle connection is never closed under a request that has arrived: uvloop runs the timers
    that fell due while the loop was busy before it reads the sockets, so a request could be
    waiting unread when the keep-alive timeout (or the header deadline) fires, and closing then
    would reset the connection under it. And past `max_connections`, a new connection is read
    and answered a 503 (`_refusal`) instead of served; connections already served are not."""
    timeout_s = options.header_timeout_s
    on_timeout = options.on_header_timeout
    max_header_bytes = options.max_header_bytes
    admission = None
    if options.max_connections is not None:
        # A refused request's body gets as long as headers do.
        admission = _Admission(options.max_connections, timeout_s or _REFUSAL_READ_S)

    class GuardedH11Protocol(H11Protocol):
        _header_deadline: asyncio.TimerHandle | None = None
        _header_bytes = 0  # of the request whose headers are arriving
        _header_tail = b""  # the last bytes read, for a blank line split over two reads
        _discard_cycle: object = None  # the answered request whose body is being thrown away
        _discarded = 0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(_CorkedTransport(transport, self.loop))
            if admission is not None and not admission.admit(self, self.loop.time()):
                self.app = admission.app
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE and not self._headers_fit(data):
                self.transport.write(_too_large(max_header_bytes))
                self.transport.close()
                return
            if self._discarding(len(data)):
                self.transport.close()
                return
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:
                self._arm()  # between requests: the next one's headers have a deadline
            else:
                self._disarm()  # headers in: the body has body_timeout_s (gateway/handlers.py)
                self._header_bytes, self._header_tail = 0, b""

        def _discarding(self, size: int) -> bool:
            """True once the body of an answered request (a 413, say) passes
            _MAX_DISCARD_BYTES: h11 would read all of it to reuse the connection."""
            cycle = self.cycle
            if cycle is None or not cycle.response_complete:
                return False
            if self.conn.their_state is not h11.SEND_BODY:
                return False
            if self._discard_cycle is not cycle:
                self._discard_cycle, self._discarded = cycle, 0
            self._discarded += size
            return self._discarded > _MAX_DISCARD_BYTES

        def _headers_fit(self, data: bytes) -> bool:
            seen = self._header_tail + data
            end = seen.find(b"\r\n\r\n")
            if end >= 0:
                size = self._header_bytes - len(self._header_tail) + end + 4
            else:
                size = self._header_bytes + len(data)
            self._header_bytes += len(data)
            self._header_tail = seen[-3:]
            return size <= max_header_bytes

        def connection_lost(self, exc: Exception | None) -> None:
            if admission is not None:
                admission.release(self)
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_deadline is None and timeout_s is not None:
                self._header_deadline = self.loop.call_later(timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _expired(self) -> None:
            self._header_deadline = None
            if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
                return
            if self._header_bytes == 0 and _unread_bytes(self.transport) and timeout_s:
                # The request's first bytes are in, unread: its deadline counts from them.
                self._header_deadline = self.loop.call_later(timeout_s, self._expired)
                return
            if on_timeout is not None:
                on_timeout()
            self.transport.close()

        def timeout_keep_alive_handler(self) -> None:
            if not self.flow.read_paused and _unread_bytes(self.transport):
                # The next request is in, unread (the loop was busy): read it, do not reset it.
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )
                return
            super().timeout_keep_alive_handler()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()  # idle now: the keep-alive timeout runs until a byte arrives

    return GuardedH11Protocol


def _config(
    app: ASGIApp, host: str, port: int, log_level: str, options: ServerOptions
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        loop=options.event_loop,
        access_log=False,
        log_config=None,  # kvroute.gateway.log_format configures logging
        log_level=log_level,
        timeout_graceful_shutdown=5,
        limit_concurrency=None,  # max_connections: _guarded_h11 refuses past it
        timeout_keep_alive=max(1, round(options.keep_alive_timeout_s)),
        http=_guarded_h11(options),
        h11_max_incomplete_event_size=options.max_header_bytes,
        ssl_certfile=None if options.tls_cert_file is None else str(options.tls_cert_file),
        ssl_keyfile=None if options.tls_key_file is None else str(options.tls_key_file),
    )


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen(host: str, port: int, backlog: int = _BACKLOG) -> list[socket.socket]:
    """TCP sockets bound and listening on every address `host` resolves to, made as asyncio's
    `create_server(host, port)` (what uvicorn calls) makes them: SO_REUSEADDR, and IPv6 sockets
    IPv6 only. An OSError (errno kept) names the address it could not bind."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot listen on {_address(host, port)}: {exc.strerror}"
        ) from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                continue  # a family this host lacks (IPv6 off), as asyncio skips it
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                reason = (exc.strerror or str(exc)).lower()
                where = _address(str(address[0]), int(address[1]))
                raise OSError(exc.errno, f"cannot listen on {where}: {reason}") from None
            sock.listen(backlog)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        where = _address(host, port)
        raise OSError(errno.EAFNOSUPPORT, f"cannot listen on {where}: no usable address family")
    return sockets


class _Server(uvicorn.Server):
    """uvicorn on sockets bound before it starts; says where it serves once started (uvicorn
    says so only for the sockets it binds itself)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and sockets:
            scheme = "https" if self.config.is_ssl else "http"
            for sock in sockets:
                host, port = sock.getsockname()[:2]
                log.info("serving", extra={"url": f"{scheme}://{_address(host, port)}"})


def serve_forever(
    app: ASGIApp,
    host: str,
    port: int,
    log_level: str = "info",
    options: ServerOptions | None = None,
    sockets: Sequence[socket.socket] | None = None,
) -> int:
    """Serve until interrupted; returns the process exit code. The port is bound before the
    app's lifespan starts anything, by `listen(host, port)` unless `sockets` (its result) are
    given, so a port in use is an OSError here instead of an exit after a full start-up."""
    config = _config(app, host, port, log_level, options or ServerOptions())
    bound = list(sockets) if sockets is not None else listen(host, port, config.backlog)
    server = _Server(config)
    try:
        server.run(sockets=bound)
    finally:
        for sock in bound:
            sock.close()
    return 0 if server.started else 1


class _InProcessServer(uvicorn.Server):
    """uvicorn that leaves the process's signal handlers alone (the host program owns them)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class BackgroundServer:
    """uvicorn on a task of the running loop; `url` is the bound address (port 0 = free port)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        startup_timeout_s: float = 30.0,
        options: ServerOptions | None = None,
    ) -> None:
        options = options or ServerOptions()
        self._server = _InProcessServer(_config(app, host, port, log_level, options))
        self._host = host
        self._scheme = "https" if options.tls_cert_file is not None else "http"
        self._startup_timeout_s = startup_timeout_s
        self._task: asyncio.Task[None] | None = None
        self.url = ""

    async def start(self) -> str:
        self._task = asyncio.create_task(self._serve())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_timeout_s
        while not self._server.started:
            if self._task.done():
                self._task.result()  # re-raise a startup exception
                raise ConfigError("gateway failed to start (see the log above)")
            if loop.time() > deadline:
                await self.stop()
                raise ConfigError(f"gateway did not start within {self._startup_timeout_s} s")
            await asyncio.sleep(0.01)
        sockets = [s for srv in self._server.servers for s in (srv.sockets or ())]
        port = sockets[0].getsockname()[1]
        self.url = f"{self._scheme}://{self._host}:{port}"
        return self.url

    async def _serve(self) -> None:
        try:
            await self._server.serve()
        except SystemExit as exc:  # uvicorn exits the process when the lifespan fails
            raise ConfigError("gateway failed to start (see the log above)") from exc

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None

    async def __aenter__(self) -> BackgroundServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
