"""The gateway's connections to an engine (the lean HTTP/1.1 client, upstream/http11.py): proxied
requests share one kept-alive connection, and an engine that closes
connections after answering (restarting, or keep-alive off without saying so) still gets every
request, on a new connection, instead of the gateway failing them with a 502."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import yaml

from kvroute.gateway import BackgroundServer, create_app
from kvroute.metrics import Metrics
from kvroute.settings import load_settings

MODEL = "raw-model"


class _RawEngine:
    """An engine over raw sockets that notes the connection each completion came on;
    `close_after` closes each connection after one answer."""

    def __init__(self, *, close_after: bool) -> None:
        self.close_after = close_after
        self.completions: list[int] = []  # the connection number of each
        self._connections = 0
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        number = self._connections
        try:
            while True:
                first = await reader.read(65536)
                if not first:
                    return
                data = bytearray(first)
                while b"\r\n\r\n" not in data:
                    more = await reader.read(65536)
                    if not more:
                        return
                    data += more
                head, _, body = bytes(data).partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                while len(body) < length:
                    body += await reader.readexactly(length - len(body))
                path = lines[0].split(" ")[1]
                if path == "/v1/completions":
                    self.completions.append(number)
                    answer = json.dumps({"id": "c", "object": "text_completion", "choices": []})
                    content_type = "application/json"
                else:  # /health, /metrics
                    answer, content_type = "", "text/plain"
                writer.write(
                    f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\n"
                    f"content-length: {len(answer)}\r\n\r\n{answer}".encode()
                )
                await writer.drain()
                if self.close_after:
                    return
        finally:
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[_RawEngine]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            server.close()


@asynccontextmanager
async def _gateway(tmp_path: Path, engine: _RawEngine) -> AsyncIterator[httpx.AsyncClient]:
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(
        yaml.safe_dump({"engines": [{"name": "e", "model": MODEL, "url": engine.url}]})
    )
    settings = load_settings(
        fleet_file=fleet_file, port=0, log_level="warning", kv_event_sync_enabled=False
    )
    async with (
        BackgroundServer(create_app(settings, metrics=Metrics())) as gateway,
        httpx.AsyncClient(base_url=gateway.url, trust_env=False, timeout=30) as http,
    ):
        yield http


async def _complete(http: httpx.AsyncClient, i: int) -> httpx.Response:
    return await http.post(
        "/v1/completions", json={"model": MODEL, "prompt": f"request {i} " * 50, "max_tokens": 1}
    )


async def test_proxied_requests_share_one_kept_alive_connection(tmp_path: Path) -> None:
    async with (
        _RawEngine(close_after=False).running() as engine,
        _gateway(tmp_path, engine) as http,
    ):
        for i in range(5):
            reply = await _complete(http, i)
            assert reply.status_code == 200, reply.text
    assert len(set(engine.completions)) == 1  # kept alive, reused (probes: a pool of their own)


async def test_an_engine_closing_each_connection_still_gets_every_request(
    tmp_path: Path,
) -> None:
    requests = 4
    async with _RawEngine(close_after=True).running() as engine, _gateway(tmp_path, engine) as http:
        for i in range(requests):
            reply = await _complete(http, i)
            assert reply.status_code == 200, reply.text
    assert len(set(engine.completions)) == requests  # a new connection each, never a closed one
