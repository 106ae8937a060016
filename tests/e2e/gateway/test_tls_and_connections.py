"""The gateway's own HTTP server: HTTPS with `tls_cert_file`/`tls_key_file`, and new
connections past `max_connections` refused with a 503 instead of queueing."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
from collections import Counter
from pathlib import Path

import httpx
import pytest

from kvroute.errors import ConfigError
from kvroute.gateway import BackgroundServer, ServerOptions, create_app
from kvroute.metrics import Metrics
from kvroute.settings import load_settings
from tests.polling import eventually


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_with_a_certificate_and_plain_http_refused(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    settings = load_settings(port=0, log_level="warning", tls_cert_file=cert, tls_key_file=key)
    options = ServerOptions(tls_cert_file=cert, tls_key_file=key)
    context = ssl.create_default_context(cafile=str(cert))
    async with BackgroundServer(create_app(settings, metrics=Metrics()), options=options) as srv:
        assert srv.url.startswith("https://")
        async with httpx.AsyncClient(verify=context, trust_env=False, timeout=30) as http:
            assert (await http.get(f"{srv.url}/healthz")).status_code == 200
        plain = srv.url.replace("https://", "http://")
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            with pytest.raises(httpx.HTTPError):
                await http.get(f"{plain}/healthz")


def test_a_certificate_without_its_key_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file"):
        load_settings(tls_cert_file=tmp_path / "cert.pem")


async def test_connections_past_the_limit_get_a_503_once_their_request_is_read() -> None:
    settings = load_settings(port=0, log_level="warning")
    options = ServerOptions(max_connections=4)
    async with BackgroundServer(create_app(settings, metrics=Metrics()), options=options) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        idle = [await asyncio.open_connection(host, int(port)) for _ in range(4)]
        try:
            # A fifth: its request, and its body of 900 KiB, is read before the answer (closing
            # with it unread would reset the connection under the answer).
            reader, writer = await asyncio.open_connection(host, int(port))
            body = b'{"prompt": "' + b"x" * (900 << 10) + b'"}'
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            answer = await _closed_by_server(reader)
            writer.close()
            head, _, payload = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503"), answer[:300]
            assert b"connection: close" in head and b"retry-after: 1" in head, head
            error = json.loads(payload)["error"]
            assert error["code"] == "too_many_connections", error
            assert error["type"] == "service_unavailable_error", error
            # The connections taken before the limit was reached are served as before.
            idle_reader, idle_writer = idle[0]
            idle_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await idle_reader.readline()).startswith(b"HTTP/1.1 200")
        finally:
            for _reader, writer in idle:
                writer.close()
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:

            async def served() -> bool:
                return (await http.get(f"{srv.url}/healthz")).status_code == 200

            await eventually(served, "served again once the idle connections closed")


async def test_a_burst_past_the_limit_serves_the_first_connections_and_refuses_the_rest() -> None:
    settings = load_settings(port=0, log_level="warning")
    options = ServerOptions(max_connections=4)
    async with BackgroundServer(create_app(settings, metrics=Metrics()), options=options) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        burst = [await asyncio.open_connection(host, int(port)) for _ in range(12)]
        try:
            for _reader, writer in burst:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            statuses = Counter()
            for reader, _writer in burst:
                async with asyncio.timeout(30):
                    statuses[(await reader.readline()).split(b" ")[1].decode()] += 1
        finally:
            for _reader, writer in burst:
                writer.close()
        assert statuses == {"200": 4, "503": 8}, statuses


async def _closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (bounded, not a sleep)."""
    async with asyncio.timeout(30):
        return await reader.read()


async def test_idle_and_slowloris_connections_are_closed_after_the_header_timeout() -> None:
    settings = load_settings(port=0, log_level="warning")
    closed: list[int] = []
    options = ServerOptions(header_timeout_s=0.3, on_header_timeout=lambda: closed.append(1))
    async with BackgroundServer(create_app(settings, metrics=Metrics()), options=options) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        idle_reader, idle_writer = await asyncio.open_connection(host, int(port))
        slow_reader, slow_writer = await asyncio.open_connection(host, int(port))
        slow_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        await slow_writer.drain()
        assert await _closed_by_server(idle_reader) == b""
        assert await _closed_by_server(slow_reader) == b""
        assert len(closed) == 2
        for writer in (idle_writer, slow_writer):
            writer.close()
        # A client that sends its request in time is served, twice on one connection: the
        # deadline is per request, and stops once the headers are in.
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            for _ in range(2):
                assert (await http.get(f"{srv.url}/healthz")).status_code == 200
        assert len(closed) == 2


async def test_headers_past_max_header_bytes_get_a_431() -> None:
    settings = load_settings(port=0, log_level="warning")
    options = ServerOptions(max_header_bytes=4096)
    async with (
        BackgroundServer(create_app(settings, metrics=Metrics()), options=options) as srv,
        httpx.AsyncClient(trust_env=False, timeout=30) as http,
    ):
        refused = await http.get(f"{srv.url}/healthz", headers={"x-big": "a" * 8192})
        assert refused.status_code == 431
        assert "at most 4096 bytes" in refused.json()["error"]["message"]
        fits = await http.get(f"{srv.url}/healthz", headers={"x-big": "a" * 3500})
        assert fits.status_code == 200
        host, port = srv.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for _ in range(10):  # in small writes: counted across reads
            writer.write(b"x-pad: " + b"b" * 500 + b"\r\n")
            await writer.drain()
        writer.write(b"\r\n")
        await writer.drain()
        assert (await _closed_by_server(reader)).startswith(b"HTTP/1.1 4")
        writer.close()


async def test_a_body_slower_than_body_timeout_gets_a_408() -> None:
    settings = load_settings(port=0, log_level="warning", body_timeout_s=0.3)
    metrics = Metrics()
    async with BackgroundServer(create_app(settings, metrics=metrics)) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"model": '
        )
        await writer.drain()
        answer = await _closed_by_server(reader)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"got 10 bytes" in body and b"request_timeout" in body
        assert metrics.http_timeouts.labels(phase="body")._value.get() == 1
