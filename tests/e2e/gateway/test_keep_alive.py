"""The keep-alive race (issue 15): a request that arrives while the gateway's loop is busy, as
its connection's keep-alive timeout (or header deadline) falls due, is answered, not reset.
uvloop, which `kvroute serve` runs on, runs the timers that fell due while it was busy before
it reads the sockets (asyncio reads first): a busy gateway closed the connection under the
request, and the client saw "connection reset by peer"."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

import pytest
import uvloop

from kvroute.gateway import BackgroundServer, ServerOptions, create_app
from kvroute.metrics import Metrics
from kvroute.settings import load_settings

T = TypeVar("T")
REQUEST = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
TIMEOUT_S = 1.0  # the keep-alive timeout or header deadline under test
PAST_DUE_S = 0.2  # how long past the timer's due time the loop stays busy
DEADLINE_S = 30.0

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


class ServerThread:
    """A BackgroundServer on an event loop of its own, in a thread, so that the test can keep
    that loop busy the way a loaded gateway's is."""

    def __init__(self, options: ServerOptions, new_loop: Callable[[], asyncio.AbstractEventLoop]):
        self.loop = new_loop()
        self.server = BackgroundServer(
            create_app(load_settings(port=0, log_level="warning"), metrics=Metrics()),
            options=options,
        )
        self.address = ("", 0)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        url = self._run(self.server.start())
        host, port = url.removeprefix("http://").split(":")
        self.address = (host, int(port))
        return self

    def __exit__(self, *exc: object) -> None:
        self._run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(DEADLINE_S)
        self.loop.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(DEADLINE_S)

    def connections(self) -> int:
        """The connections the server has taken (accepted, each given its protocol)."""
        return len(self.server._server.server_state.connections)

    @contextmanager
    def busy_until(self, done: Callable[[], bool]) -> Iterator[None]:
        """Keep the server's loop busy in an I/O callback, as a loaded gateway's is with the
        reads it handles, from entering the block until `done()` holds."""
        wake, ring = socket.socketpair()
        busy = threading.Event()

        def work() -> None:
            self.loop.remove_reader(wake)
            busy.set()
            deadline = time.monotonic() + DEADLINE_S
            while not done() and time.monotonic() < deadline:
                pass

        with wake, ring:
            self.loop.call_soon_threadsafe(self.loop.add_reader, wake, work)
            ring.send(b"!")
            assert busy.wait(DEADLINE_S), "the server's loop never got busy"
            yield


def _answer(sock: socket.socket) -> bytes:
    """The response to REQUEST (its headers and its body), or what came before the server
    closed the connection; a reset raises ConnectionResetError."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


def _send_while_busy(server: ServerThread, sock: socket.socket, due: float) -> bytes:
    """Send REQUEST while the server's loop is busy past `due` (when the timer under test falls
    due); the answer, once the loop is free again."""
    sent = threading.Event()
    with server.busy_until(lambda: sent.is_set() and time.monotonic() > due + PAST_DUE_S):
        sock.sendall(REQUEST)
        sent.set()
    try:
        return _answer(sock)
    except ConnectionResetError as exc:
        pytest.fail(f"the connection was reset under the request: {exc}")


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_request_arriving_as_the_keep_alive_timeout_falls_due_is_answered(loop: str) -> None:
    with ExitStack() as stack:
        options = ServerOptions(keep_alive_timeout_s=TIMEOUT_S)
        server = stack.enter_context(ServerThread(options, LOOPS[loop]))
        sock = stack.enter_context(socket.create_connection(server.address, DEADLINE_S))
        sock.sendall(REQUEST)
        assert _answer(sock).startswith(b"HTTP/1.1 200"), "the first request"
        # The server finished that answer before it arrived here: its keep-alive timer is due
        # before `due`.
        answer = _send_while_busy(server, sock, time.monotonic() + TIMEOUT_S)
        assert answer.startswith(b"HTTP/1.1 200"), f"the second request got {answer!r}"


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_request_arriving_as_the_header_deadline_falls_due_is_answered(loop: str) -> None:
    with ExitStack() as stack:
        options = ServerOptions(header_timeout_s=TIMEOUT_S)
        server = stack.enter_context(ServerThread(options, LOOPS[loop]))
        sock = stack.enter_context(socket.create_connection(server.address, DEADLINE_S))
        deadline = time.monotonic() + DEADLINE_S
        while server.connections() == 0:  # polling for the accept, bounded
            assert time.monotonic() < deadline, "the server never took the connection"
            time.sleep(0.005)
        # Its header deadline runs from the accept, which came before `due`.
        answer = _send_while_busy(server, sock, time.monotonic() + TIMEOUT_S)
        assert answer.startswith(b"HTTP/1.1 200"), f"the request got {answer!r}"
