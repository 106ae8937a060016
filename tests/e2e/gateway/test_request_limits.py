"""Client request limits on a running gateway (README "Limits"): a body over
`max_request_body_bytes` is refused as soon as its length shows it, before the rest is read; a
prompt over `max_prompt_tokens` gets an OpenAI-shaped 400; a client that leaves mid-upload
costs a 499 and no traceback."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from kvroute.gateway import BackgroundServer, create_app
from kvroute.metrics import Metrics
from kvroute.settings import load_settings
from kvroute.sim import SimConfig, SimFleet
from tests.polling import eventually

MODEL = "sim-model"
BODY_LIMIT = 4096
PROMPT_LIMIT = 200


@pytest.fixture
async def gateway_url(tmp_path: Path) -> AsyncIterator[str]:
    async with SimFleet(1, MODEL, config=SimConfig(speed=50.0)) as fleet:
        fleet.write_fleet_file(tmp_path / "fleet.yaml")
        settings = load_settings(
            fleet_file=tmp_path / "fleet.yaml",
            port=0,
            log_level="warning",
            max_request_body_bytes=BODY_LIMIT,
            max_prompt_tokens=PROMPT_LIMIT,
        )
        async with BackgroundServer(create_app(settings, metrics=Metrics())) as server:
            yield server.url


def _error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error, dict)
    return error


async def test_a_body_over_the_limit_is_refused_by_its_length_or_as_it_streams(
    gateway_url: str,
) -> None:
    big = json.dumps({"model": MODEL, "prompt": "x" * (2 * BODY_LIMIT)}).encode()
    async with httpx.AsyncClient(base_url=gateway_url, trust_env=False, timeout=30) as http:
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/route"):
            error = _error(await http.post(path, content=big), 413)
            assert f"at most {BODY_LIMIT} bytes, got {len(big)}" in str(error["message"])

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
            for i in range(0, len(big), 1024):
                yield big[i : i + 1024]

        error = _error(await http.post("/v1/completions", content=chunks()), 413)
        assert f"at most {BODY_LIMIT} bytes" in str(error["message"])
        ok = await http.post(
            "/v1/completions", json={"model": MODEL, "prompt": "small", "max_tokens": 1}
        )
        assert ok.status_code == 200, ok.text


async def test_a_prompt_over_the_token_limit_gets_a_400(gateway_url: str) -> None:
    async with httpx.AsyncClient(base_url=gateway_url, trust_env=False, timeout=30) as http:
        ids = {"model": MODEL, "prompt": list(range(1, PROMPT_LIMIT + 2)), "max_tokens": 1}
        error = _error(await http.post("/v1/completions", json=ids), 400)
        assert error["code"] == "context_length_exceeded"
        assert f"at most {PROMPT_LIMIT} tokens, got {PROMPT_LIMIT + 1}" in str(error["message"])
        words = " ".join(["word"] * (PROMPT_LIMIT + 50))  # tokenized, then refused
        error = _error(await http.post("/v1/route", json={"model": MODEL, "prompt": words}), 400)
        assert error["code"] == "context_length_exceeded"
        fits = {"model": MODEL, "prompt": list(range(1, PROMPT_LIMIT)), "max_tokens": 1}
        assert (await http.post("/v1/completions", json=fits)).status_code == 200


async def test_a_client_that_leaves_mid_upload_costs_no_traceback(
    gateway_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = gateway_url.removeprefix("http://").split(":")
    caplog.set_level(logging.DEBUG)
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2000\r\n\r\n" + b'{"model": "sim-model", "prompt": "'
    )
    await writer.drain()
    writer.close()  # gone with 1,960 bytes unsent
    await writer.wait_closed()
    await eventually(
        lambda: any("while sending its request" in r.getMessage() for r in caplog.records),
        "the gateway saw the client leave",
        timeout_s=15.0,
    )
    async with httpx.AsyncClient(base_url=gateway_url, trust_env=False, timeout=30) as http:
        # The gateway still serves, and the request it lost logged no traceback.
        ok = await http.post(
            "/v1/completions", json={"model": MODEL, "prompt": "after", "max_tokens": 1}
        )
        assert ok.status_code == 200, ok.text
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


async def test_the_rest_of_a_refused_body_is_read_only_up_to_a_bound(gateway_url: str) -> None:
    host, port = gateway_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    declared = 64 << 20
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % declared
    )
    await writer.drain()
    async with asyncio.timeout(30):
        status = await reader.readline()
    assert status.startswith(b"HTTP/1.1 413"), status
    sent = 0
    chunk = b" " * (64 << 10)
    with pytest.raises(ConnectionError):  # reset once the gateway stops reading and closes
        async with asyncio.timeout(30):
            while sent < declared:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
    writer.close()
    assert sent < declared  # the gateway closed long before 64 MiB
