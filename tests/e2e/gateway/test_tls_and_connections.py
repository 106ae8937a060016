"""The gateway's own HTTP server: HTTPS with `tls_cert_file`/`tls_key_file`, and new
connections past `max_connections` refused with a 503 instead of queueing."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
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


async def test_connections_past_the_limit_get_a_503(tmp_path: Path) -> None:
    settings = load_settings(port=0, log_level="warning")
    options = ServerOptions(max_connections=4)
    async with BackgroundServer(create_app(settings, metrics=Metrics()), options=options) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        idle = [await asyncio.open_connection(host, int(port)) for _ in range(4)]
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
                refused = await http.get(f"{srv.url}/healthz")
            assert refused.status_code == 503, refused.text
        finally:
            for _reader, writer in idle:
                writer.close()
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:

            async def served() -> bool:
                return (await http.get(f"{srv.url}/healthz")).status_code == 200

            await eventually(served, "served again once the idle connections closed")
