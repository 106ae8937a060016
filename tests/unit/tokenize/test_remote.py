"""RemoteTokenizer over the real engine client, against a real in-process ASGI app shaped like
vLLM's /tokenize (ref. §7)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from kvroute.errors import EngineConnectError, TokenizeError
from kvroute.tokenize import RemoteTokenizer
from kvroute.upstream import HttpxEngineClient
from tests.engine_clients import engine_client

BOS = 1


def _word_ids(text: str) -> list[int]:
    return [100 + sum(w.encode()) % 900 for w in text.split()]


@dataclass
class _Engine:
    """A tiny vLLM-shaped /tokenize: ids per word, BOS when add_special_tokens, a chat template."""

    bodies: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "ok"  # ok | error | not_json | no_tokens | bad_tokens | huge_tokens | hang
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def tokenize(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        if self.mode == "error":
            return JSONResponse({"error": {"message": "model not found", "code": 404}}, 404)
        if self.mode == "not_json":
            return PlainTextResponse("<html>oops</html>")
        if self.mode == "no_tokens":
            return JSONResponse({"count": 0})
        if self.mode == "bad_tokens":
            return JSONResponse({"count": 2, "tokens": [1, "two"]})
        if self.mode == "huge_tokens":
            return JSONResponse({"count": 2, "tokens": [1, 2**32]})
        if self.mode == "hang":
            await self.release.wait()
        if "messages" in body:
            text = " ".join(f"<{m['role']}> {m['content']}" for m in body["messages"])
            if body.get("add_generation_prompt", True):
                text += " <assistant>"
            if (body.get("chat_template_kwargs") or {}).get("enable_thinking"):
                text += " <think>"
            ids = [BOS, *_word_ids(text)]
        else:
            ids = _word_ids(body["prompt"])
            if body.get("add_special_tokens", True):
                ids = [BOS, *ids]
        return JSONResponse({"count": len(ids), "max_model_len": 4096, "tokens": ids})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/tokenize", self.tokenize, methods=["POST"])])


@pytest.fixture
async def engine() -> AsyncIterator[_Engine]:
    e = _Engine()
    yield e
    e.release.set()


@pytest.fixture
async def client(engine: _Engine) -> AsyncIterator[HttpxEngineClient]:
    async with engine_client(httpx.ASGITransport(app=engine.app())) as c:
        yield c


def _urls(model: str) -> str | None:
    return {"llama": "http://engine-a:8000", "llama-sql": "http://engine-a:8000/"}.get(model)


def _tokenizer(client: HttpxEngineClient, **kw: Any) -> RemoteTokenizer:
    return RemoteTokenizer(client, _urls, **{"timeout_s": 5.0, **kw})


async def test_prompt_uses_completion_form_with_special_tokens(
    engine: _Engine, client: HttpxEngineClient
) -> None:
    tok = _tokenizer(client)
    ids = await tok.tokenize_prompt("llama", "hello big world")
    assert ids == [BOS, *_word_ids("hello big world")]
    assert engine.bodies == [
        {"model": "llama", "prompt": "hello big world", "add_special_tokens": True}
    ]


async def test_chat_uses_chat_form_so_the_engine_template_applies(
    engine: _Engine, client: HttpxEngineClient
) -> None:
    tok = _tokenizer(client)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ids = await tok.tokenize_chat("llama", messages)
    assert ids == [BOS, *_word_ids("<system> be brief <user> hi <assistant>")]
    assert engine.bodies == [
        {"model": "llama", "messages": messages, "add_generation_prompt": True}
    ]


async def test_chat_flags_are_forwarded(engine: _Engine, client: HttpxEngineClient) -> None:
    tok = _tokenizer(client)
    messages = [{"role": "user", "content": "hi"}]
    ids = await tok.tokenize_chat(
        "llama",
        messages,
        add_generation_prompt=False,
        chat_template_kwargs={"enable_thinking": True},
    )
    assert ids == [BOS, *_word_ids("<user> hi <think>")]
    assert engine.bodies[0]["add_generation_prompt"] is False
    assert engine.bodies[0]["chat_template_kwargs"] == {"enable_thinking": True}


async def test_lora_name_is_sent_as_the_model(engine: _Engine, client: HttpxEngineClient) -> None:
    # a trailing slash on the engine URL does not double up
    await _tokenizer(client).tokenize_prompt("llama-sql", "x")
    assert engine.bodies[0]["model"] == "llama-sql"


async def test_prompt_given_as_token_ids_is_returned_without_a_request(
    engine: _Engine, client: HttpxEngineClient
) -> None:
    tok = _tokenizer(client)
    assert await tok.tokenize_prompt("llama", [5, 6, 7]) == [5, 6, 7]
    assert engine.bodies == []


@pytest.mark.parametrize("bad", [[1, -2], [1, True], [1, "2"], [1.0], [1, 2**32]])
async def test_bad_token_id_prompt_is_a_tokenize_error(client: HttpxEngineClient, bad: Any) -> None:
    with pytest.raises(TokenizeError, match="expected a list of token ids"):
        await _tokenizer(client).tokenize_prompt("llama", bad)


async def test_unknown_model_is_a_tokenize_error(client: HttpxEngineClient) -> None:
    with pytest.raises(TokenizeError, match="no engine serves"):
        await _tokenizer(client).tokenize_prompt("mystery", "x")


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("error", "expected status 200, got 404"),
        ("not_json", "expected a JSON body, got '<html>oops</html>'"),
        ("no_tokens", "expected an object with 'tokens'.*missing required field `tokens`"),
        ("bad_tokens", r"Expected `int`, got `str` - at `\$\.tokens\[1\]`"),
        ("huge_tokens", r"Expected `int` <= 4294967295 - at `\$\.tokens\[1\]`"),
    ],
)
async def test_bad_engine_answers_are_tokenize_errors(
    engine: _Engine, client: HttpxEngineClient, mode: str, message: str
) -> None:
    engine.mode = mode
    with pytest.raises(TokenizeError, match=message):
        await _tokenizer(client).tokenize_prompt("llama", "x")


async def test_a_hanging_engine_times_out(engine: _Engine, client: HttpxEngineClient) -> None:
    engine.mode = "hang"
    tok = _tokenizer(client, timeout_s=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TokenizeError, match=r"timed out after 0\.2 s"):
        await tok.tokenize_prompt("llama", "x")
    assert loop.time() - started < 5.0


async def test_connect_failure_is_a_tokenize_error_from_the_engine_connect_error() -> None:
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with engine_client() as real:
        tok = RemoteTokenizer(real, lambda _m: f"http://127.0.0.1:{port}", timeout_s=5.0)
        with pytest.raises(TokenizeError, match="ConnectError") as info:
            await tok.tokenize_chat("llama", [{"role": "user", "content": "x"}])
    assert isinstance(info.value.__cause__, EngineConnectError)


async def test_remote_latency_is_observed_for_answered_calls(
    engine: _Engine, client: HttpxEngineClient
) -> None:
    seen: list[tuple[str, float]] = []
    tok = _tokenizer(client, observe=lambda mode, s: seen.append((mode, s)))
    await tok.tokenize_prompt("llama", "a b")
    await tok.tokenize_chat("llama", [{"role": "user", "content": "x"}])
    await tok.tokenize_prompt("llama", [1, 2])  # ids: no call, nothing to time
    engine.mode = "error"
    with pytest.raises(TokenizeError):
        await tok.tokenize_prompt("llama", "a b")
    assert [mode for mode, _ in seen] == ["remote", "remote"]
    assert all(s >= 0 for _, s in seen)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "x", "weight": float("nan")}],
        [{"role": "user", "content": "lone \ud800 surrogate"}],
        [{"role": "user", "content": object()}],
    ],
)
async def test_a_body_json_cannot_encode_is_a_tokenize_error(
    client: HttpxEngineClient, messages: list[dict[str, Any]]
) -> None:
    tokenizer = _tokenizer(client)
    with pytest.raises(TokenizeError, match="not encodable as JSON"):
        await tokenizer.tokenize_chat("llama", messages)
