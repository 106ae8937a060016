"""The simulated fleet's sockets: ports chosen before they are bound never collide; no Nagle."""

from __future__ import annotations

import asyncio
import socket

import pytest

from kvroute.sim import fleet
from kvroute.sim.fleet import _consecutive_free_ports, _listen_socket


class _Picks:
    """Stands in for the fleet's random generator: hands out the given bases in turn."""

    def __init__(self, *bases: int) -> None:
        self.bases = list(bases)

    def randrange(self, _start: int, _stop: int) -> int:
        return self.bases.pop(0)


def _free_pairs(n: int) -> list[int]:
    """`n` bases of two free consecutive ports each, far apart."""
    found: list[int] = []
    for base in range(20_000, 30_000, 101):
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
        except OSError:
            continue
        found.append(base)
        if len(found) == n:
            return found
    raise OSError("no free pairs of ports")


def test_a_base_overlapping_ports_picked_for_another_socket_is_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The replay ports are picked before the event ports are bound: a free-looking port
    # that the other socket is about to take must be passed over.
    events, other = _free_pairs(2)
    monkeypatch.setattr(fleet, "_PICK", _Picks(events + 1, events, other))
    base = _consecutive_free_ports("127.0.0.1", 2, avoid=range(events, events + 2))
    assert base == other


def test_no_free_base_outside_the_avoided_ports_is_an_error() -> None:
    with pytest.raises(OSError, match="no 2 consecutive free TCP ports"):
        _consecutive_free_ports("127.0.0.1", 2, attempts=5, avoid=range(0, 65_536))


async def test_engine_connections_send_without_nagle() -> None:
    """asyncio turns Nagle off only on sockets that say TCP: with it on, a request right after
    another on one connection (a router's /tokenize, then the prompt) waited ~40 ms for a
    delayed ACK."""
    listener = _listen_socket("127.0.0.1", 0)
    nodelay: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        nodelay.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(accepted, sock=listener)
    async with server:
        _reader, writer = await asyncio.open_connection(*listener.getsockname())
        assert await asyncio.wait_for(nodelay, 10) != 0
        writer.close()
        await writer.wait_closed()
