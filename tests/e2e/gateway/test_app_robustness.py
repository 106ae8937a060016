"""The gateway against garbage bodies and misbehaving engines: OpenAI-shaped 4xx/5xx, never an
unhandled 500, every failure counted; and `/v1/route` answers with exactly its contract's fields."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from kvroute.gateway import ENGINE_HEADER, BackgroundServer, create_app
from kvroute.metrics import Metrics
from kvroute.settings import load_settings
from kvroute.sim import SimConfig, SimFleet

MODEL = "sim-model"
ROUTE_FIELDS = {"engine", "policy", "prompt_tokens", "queue_weight", "engines"}
ROUTE_ENGINE_FIELDS = {
    "name",
    "blocks_matched",
    "tokens_matched",
    "by_medium",
    "speculative_blocks",
    "outstanding_tokens",
    "queued_prefill_tokens",
    "free_kv_tokens",
    "evicting",
    "cost",
    "healthy",
    "stale",
}
_CHAT = "/v1/chat/completions"
_COMPLETIONS = "/v1/completions"
_USER = [{"role": "user", "content": "x"}]


def _body(**fields: object) -> bytes:
    return json.dumps({"model": MODEL, **fields}).encode()


GARBAGE: list[tuple[str, bytes, str | None]] = [
    (_COMPLETIONS, b"", None),
    (_COMPLETIONS, b"null", None),
    (_COMPLETIONS, b"[]", None),
    (_COMPLETIONS, b'"text"', None),
    (_COMPLETIONS, b"[" * 50_000, None),
    (_COMPLETIONS, b'{"model": "sim-model", "prompt": "x", "max_tokens": NaN}', "max_tokens"),
    (_COMPLETIONS, b'{"model": "sim-model", "prompt": "x", "max_tokens": 1e999}', "max_tokens"),
    (
        _COMPLETIONS,
        b'{"model": "sim-model", "prompt": "x", "max_tokens": 1' + b"0" * 4000 + b"}",
        "max_tokens",
    ),
    (
        _COMPLETIONS,
        b'{"model": "sim-model", "prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}",
        None,
    ),
    (_COMPLETIONS, _body(prompt="x", max_tokens=2**31), "max_tokens"),
    (_COMPLETIONS, _body(prompt="x", max_tokens=1.5), "max_tokens"),
    (_COMPLETIONS, _body(prompt="x", max_tokens="16"), "max_tokens"),
    (_COMPLETIONS, _body(prompt="x", max_tokens=[16]), "max_tokens"),
    (_COMPLETIONS, _body(prompt=[2**32] * 40), "prompt"),
    (_COMPLETIONS, _body(prompt=[-1] * 40), "prompt"),
    (_COMPLETIONS, _body(prompt=[[10**30] * 40]), "prompt"),
    (_COMPLETIONS, _body(prompt=[]), "prompt"),
    (_COMPLETIONS, _body(prompt=7), "prompt"),
    (_COMPLETIONS, _body(prompt=None), "prompt"),
    (_COMPLETIONS, _body(prompt=[1.5, 2.5]), "prompt"),
    (_COMPLETIONS, b'{"model": "sim-model", "prompt": "\\ud800 lone surrogate"}', None),
    (_COMPLETIONS, json.dumps({"model": 7, "prompt": "x"}).encode(), "model"),
    (_COMPLETIONS, _body(prompt="x", stream=1), "stream"),
    (_CHAT, _body(messages=[]), "messages"),
    (_CHAT, _body(messages={}), "messages"),
    (_CHAT, _body(messages="hello"), "messages"),
    (_CHAT, _body(messages=[1, 2]), "messages"),
    (_CHAT, _body(messages=_USER, max_tokens=-3), "max_tokens"),
    (_CHAT, _body(messages=_USER, max_completion_tokens=True), "max_completion_tokens"),
    (_CHAT, _body(messages=_USER, cache_salt=5), "cache_salt"),
    (_CHAT, b'{"model": "sim-model", "messages": [{"role": "user", "content": "\\udfff"}]}', None),
    ("/v1/route", b"\xff\xfe", None),
    ("/v1/route", _body(prompt=[2**33] * 40), "prompt"),
    ("/v1/route", _body(messages=[{"role": "user", "content": "\ud800"}]), None),
]


@pytest.fixture
async def gateway_url(tmp_path: Path) -> AsyncIterator[str]:
    async with SimFleet(2, MODEL, config=SimConfig(speed=50.0)) as fleet:
        fleet.write_fleet_file(tmp_path / "fleet.yaml")
        settings = load_settings(fleet_file=tmp_path / "fleet.yaml", port=0, log_level="warning")
        async with BackgroundServer(create_app(settings, metrics=Metrics())) as server:
            yield server.url


async def test_garbage_bodies_get_openai_400s_and_never_a_500(gateway_url: str) -> None:
    async with httpx.AsyncClient(base_url=gateway_url, trust_env=False, timeout=30) as http:
        for path, content, param in GARBAGE:
            response = await http.post(path, content=content)
            what = f"{path} {content[:80]!r}"
            assert response.status_code == 400, (what, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, what
            assert error["type"] == "invalid_request_error", what
            assert error["param"] == param, (what, error)
            assert error["message"], what
        ok = await http.post(_COMPLETIONS, content=_body(prompt="still serving", max_tokens=2))
        assert ok.status_code == 200, ok.text
        # Valid to Python's parser, not to the strict JSON of the /tokenize call: routed by
        # load (counted), and the engine judges the body it is sent unchanged.
        nan = b'{"model": "sim-model", "messages": [{"role": "user", "content": "x", "w": NaN}]}'
        routed = await http.post(_CHAT, content=nan)
        assert routed.status_code == 200, routed.text
        assert "kvroute_tokenize_failures_total 1.0" in (await http.get("/metrics")).text


async def test_unknown_paths_and_wrong_methods_get_openai_shaped_errors(gateway_url: str) -> None:
    async with httpx.AsyncClient(base_url=gateway_url, trust_env=False, timeout=30) as http:
        for method, path, status in [
            ("GET", "/v1/completions", 405),
            ("POST", "/v1/models", 405),
            ("GET", "/v1/embeddings", 405),  # passed through, but POST only
            ("GET", "/v1/nowhere", 404),
            ("POST", "/nowhere", 404),
        ]:
            response = await http.request(method, path)
            assert response.status_code == status, (method, path)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error" and path in error["message"]
        allowed = (await http.get("/v1/completions")).headers["allow"]
        assert "POST" in allowed


async def test_route_answers_with_exactly_the_contract_fields(gateway_url: str) -> None:
    async with httpx.AsyncClient(base_url=gateway_url, trust_env=False, timeout=30) as http:
        for body in (_body(prompt="hello there"), _body(messages=_USER)):
            response = await http.post("/v1/route", content=body)
            assert response.status_code == 200, response.text
            data = response.json()
            assert set(data) == ROUTE_FIELDS
            assert data["policy"] == "kv_aware" and data["engine"] in {"engine-0", "engine-1"}
            assert isinstance(data["prompt_tokens"], int) and data["prompt_tokens"] > 0
            assert sorted(e["name"] for e in data["engines"]) == ["engine-0", "engine-1"]
            for engine in data["engines"]:
                assert set(engine) == ROUTE_ENGINE_FIELDS
                for name in ("blocks_matched", "tokens_matched", "speculative_blocks"):
                    assert isinstance(engine[name], int), name
                assert isinstance(engine["outstanding_tokens"], int)
                assert engine["queued_prefill_tokens"] == 0.0  # nothing sent yet
                assert isinstance(engine["cost"], float)
                assert isinstance(engine["by_medium"], dict)
                assert engine["healthy"] is True and engine["stale"] is False


class _BadEngine:
    """An engine that answers `/v1/completions` by the prompt: `fail` → a 500 error object,
    `cut-stream` → one SSE event then a broken chunked body, `cut-json` → half a JSON body,
    `hang-up` → the connection closed before any answer."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.decode().split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body: dict[str, Any] = json.loads(await reader.readexactly(length)) if length else {}
            prompt = body.get("prompt")
            if prompt == "fail":
                payload = json.dumps(
                    {"error": {"message": "boom", "type": "InternalServerError", "code": 500}}
                ).encode()
                writer.write(
                    b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(payload), payload)
                )
            elif prompt == "cut-stream":
                event = b'data: {"choices": [{"index": 0, "text": "a"}]}\n\n'
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(event), event)
                )
            elif prompt == "hang-up":
                pass  # close without a word
            elif prompt == "cut-json":
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b'content-length: 400\r\n\r\n{"id": "cmpl-1", "choi'
                )
            await writer.drain()
        finally:
            writer.close()


async def test_engine_errors_and_broken_answers_reach_the_client_cleanly_and_are_counted(
    tmp_path: Path,
) -> None:
    engine = _BadEngine()
    await engine.start()
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(
        yaml.safe_dump({"engines": [{"name": "bad", "model": MODEL, "url": engine.url}]})
    )
    settings = load_settings(
        fleet_file=fleet_file,
        port=0,
        log_level="warning",
        health_interval_s=60.0,
        kv_event_sync_enabled=False,
    )
    try:
        async with (
            BackgroundServer(create_app(settings, metrics=Metrics())) as server,
            httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=30) as http,
            openai.AsyncOpenAI(
                base_url=f"{server.url}/v1",
                api_key="unused",
                max_retries=0,
                http_client=httpx.AsyncClient(timeout=30.0, trust_env=False),
            ) as sdk,
        ):
            # An engine's own error passes through, status and OpenAI body alike.
            failed = await http.post(_COMPLETIONS, content=_body(prompt="fail"))
            assert failed.status_code == 500
            assert failed.json()["error"]["message"] == "boom"
            assert failed.headers[ENGINE_HEADER] == "bad"

            # A non-streamed answer cut mid-body: a 502 in OpenAI's shape, not a cut 200.
            cut = await http.post(_COMPLETIONS, content=_body(prompt="cut-json"))
            assert cut.status_code == 502, cut.text
            error = cut.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert (error["type"], error["code"]) == ("upstream_error", "engine_error")

            # The connection closed before any answer (not a connect failure: no retry).
            gone = await http.post(_COMPLETIONS, content=_body(prompt="hang-up"))
            assert gone.status_code == 502, gone.text
            assert gone.json()["error"]["code"] == "engine_error"

            # A stream cut after its first event: the SDK sees the event, then an error.
            stream = await sdk.completions.create(model=MODEL, prompt="cut-stream", stream=True)
            texts: list[str] = []
            with pytest.raises(openai.APIError, match="stream broke"):
                async for chunk in stream:
                    texts.append(chunk.choices[0].text)
            assert texts == ["a"]

            metrics = (await http.get("/metrics")).text
            assert (
                'kvroute_requests_total{engine="bad",policy="least_loaded",status="500"} 1.0'
                in (metrics)
            )
            assert (
                'kvroute_requests_total{engine="bad",policy="least_loaded",'
                'status="upstream_error"} 3.0' in metrics
            )
            engines = (await http.get("/debug/engines")).json()["engines"]
            assert engines[0]["in_flight_requests"] == 0 and engines[0]["outstanding_tokens"] == 0
            assert (await http.get("/healthz")).status_code == 200
    finally:
        await engine.close()
