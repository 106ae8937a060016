"""HttpxEngineClient against real HTTP servers on 127.0.0.1: a Starlette app under uvicorn shaped
like vLLM's API, a raw socket server that breaks off, and a closed port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from kvroute.core import EngineClient
from kvroute.errors import EngineConnectError, EngineResponseError, TokenizeError
from kvroute.gateway.server import BackgroundServer
from kvroute.upstream import HttpxEngineClient
from kvroute.upstream.http11 import HttpError

DEADLINE_S = 10.0


@dataclass
class _Engine:
    """vLLM's /health, /metrics, /tokenize and a streaming POST; `/hang/...` never answers,
    `/drip/...` answers with a body that never ends, `/wait` notes when its client leaves."""

    health: int = 200
    tokenize_answer: bytes | None = None  # raw /tokenize body instead of the real answer
    bodies: list[dict[str, Any]] = field(default_factory=list)
    cookies: list[str | None] = field(default_factory=list)  # each /tokenize call's Cookie
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends hangs and drips
    second_chunk: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: asyncio.Event = field(default_factory=asyncio.Event)
    client_left: asyncio.Event = field(default_factory=asyncio.Event)

    async def health_route(self, request: Request) -> Response:
        return Response(status_code=self.health)

    async def metrics_route(self, request: Request) -> Response:
        return PlainTextResponse("# TYPE vllm:num_requests_running gauge\n")

    async def tokenize(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        self.cookies.append(request.headers.get("cookie"))
        if self.tokenize_answer is not None:
            return Response(self.tokenize_answer, media_type="application/json")
        words = (body.get("prompt") or json.dumps(body.get("messages"))).split()
        return JSONResponse(
            {"count": len(words), "tokens": list(range(len(words)))},
            headers={"set-cookie": "session=engine; Path=/"},  # as a sticky balancer might
        )

    async def stream(self, request: Request) -> Response:
        body = await request.body()

        async def chunks() -> AsyncIterator[bytes]:
            yield b"data: first " + body + b"\n\n"
            await self.second_chunk.wait()
            yield b"data: second\n\n"

        response = StreamingResponse(
            chunks(), media_type="text/event-stream", headers={"x-engine-note": "a"}
        )
        response.raw_headers.append((b"x-engine-note", b"b"))  # a header sent twice
        return response

    async def hang(self, request: Request) -> Response:
        await self.release.wait()
        return Response(status_code=204)

    async def drip(self, request: Request) -> Response:
        async def forever() -> AsyncIterator[bytes]:
            while not self.release.is_set():
                yield b"# slow\n"
                await asyncio.sleep(0.02)

        return StreamingResponse(forever(), media_type="text/plain")

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/health", self.health_route),
                Route("/metrics", self.metrics_route),
                Route("/tokenize", self.tokenize, methods=["POST"]),
                Route("/v1/completions", self.stream, methods=["POST"]),
                Route("/wait", _WaitForDisconnect(self), methods=["POST"]),
                Route("/hang/{rest:path}", self.hang, methods=["GET", "POST"]),
                Route("/drip/{rest:path}", self.drip, methods=["GET", "POST"]),
            ]
        )


class _WaitForDisconnect:
    """A raw ASGI endpoint: read the request, never answer, note when the client goes away."""

    def __init__(self, engine: _Engine) -> None:
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        while message["type"] == "http.request" and message.get("more_body"):
            message = await receive()
        self.engine.waiting.set()
        while message["type"] != "http.disconnect":
            message = await receive()
        self.engine.client_left.set()


@pytest.fixture
async def engine() -> AsyncIterator[tuple[_Engine, str]]:
    state = _Engine()
    async with BackgroundServer(state.app()) as server:
        try:
            yield state, server.url
        finally:
            state.release.set()
            state.second_chunk.set()


def _client(**kw: Any) -> HttpxEngineClient:
    options: dict[str, Any] = {
        "connect_timeout_s": 5.0,
        "read_timeout_s": 5.0,
        "max_connections": 10,
        **kw,
    }
    return HttpxEngineClient(**options)


@pytest.fixture
async def client() -> AsyncIterator[HttpxEngineClient]:
    async with _client() as c:
        yield c


def _closed_port_url() -> str:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_the_httpx_client_is_an_engine_client() -> None:
    async with _client() as concrete:
        client: EngineClient = concrete  # checked by mypy: the protocol is structural
        assert client is concrete


async def test_health_returns_the_status_code(
    engine: tuple[_Engine, str], client: HttpxEngineClient
) -> None:
    state, url = engine
    assert await client.health(url, timeout_s=5.0) == 200
    state.health = 503
    assert await client.health(url + "/", timeout_s=5.0) == 503  # a trailing slash is fine


async def test_metrics_text_returns_the_body_and_rejects_other_statuses(
    engine: tuple[_Engine, str], client: HttpxEngineClient
) -> None:
    _, url = engine
    assert await client.metrics_text(url, timeout_s=5.0) == (
        "# TYPE vllm:num_requests_running gauge\n"
    )
    with pytest.raises(EngineResponseError, match=r"GET .*/nope/metrics: expected status 200"):
        await client.metrics_text(url + "/nope", timeout_s=5.0)


async def test_tokenize_sends_the_prompt_and_chat_forms(
    engine: tuple[_Engine, str], client: HttpxEngineClient
) -> None:
    state, url = engine
    assert await client.tokenize_prompt(
        url, "m", "a b c", add_special_tokens=True, timeout_s=5.0
    ) == [0, 1, 2]
    messages = [{"role": "user", "content": "hi"}]
    await client.tokenize_chat(
        url, "m", messages, add_generation_prompt=False, chat_template_kwargs=None, timeout_s=5.0
    )
    await client.tokenize_chat(
        url,
        "m",
        messages,
        add_generation_prompt=True,
        chat_template_kwargs={"enable_thinking": True},
        timeout_s=5.0,
    )
    assert state.bodies == [
        {"model": "m", "prompt": "a b c", "add_special_tokens": True},
        {"model": "m", "messages": messages, "add_generation_prompt": False},
        {
            "model": "m",
            "messages": messages,
            "add_generation_prompt": True,
            "chat_template_kwargs": {"enable_thinking": True},
        },
    ]


async def test_a_cookie_an_engine_sets_is_never_sent_back_on_other_calls(
    engine: tuple[_Engine, str], client: HttpxEngineClient
) -> None:
    state, url = engine
    for _ in range(2):
        await client.tokenize_prompt(url, "m", "a b", add_special_tokens=True, timeout_s=5)
    assert state.cookies == [None, None]  # one client's session is not every client's


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"<html>oops</html>", "expected a JSON body, got '<html>oops</html>'"),
        (b'{"count": 1}', "expected an object with 'tokens'"),
        (b'{"tokens": [1, true]}', r"Expected `int`, got `bool` - at `\$\.tokens\[1\]`"),
        (b'{"tokens": [-1]}', r"Expected `int` >= 0"),
        (b'{"tokens": [4294967296]}', r"Expected `int` <= 4294967295"),
        (b"[1, 2]", r"Expected `object`, got `array`"),
    ],
)
async def test_unusable_tokenize_answers_are_response_errors(
    engine: tuple[_Engine, str], client: HttpxEngineClient, answer: bytes, message: str
) -> None:
    state, url = engine
    state.tokenize_answer = answer
    with pytest.raises(EngineResponseError, match=message):
        await client.tokenize_prompt(url, "m", "x", add_special_tokens=True, timeout_s=5.0)


async def test_an_error_status_from_tokenize_is_a_response_error_with_the_body(
    engine: tuple[_Engine, str], client: HttpxEngineClient
) -> None:
    _, url = engine
    with pytest.raises(EngineResponseError, match=r"expected status 200, got 404: 'Not Found'"):
        await client.tokenize_prompt(url + "/nope", "m", "x", add_special_tokens=True, timeout_s=5)


@pytest.mark.parametrize(
    "content", [float("nan"), "lone \ud800 surrogate", object()], ids=["nan", "surrogate", "obj"]
)
async def test_a_request_not_encodable_as_strict_json_is_a_tokenize_error_and_never_sent(
    engine: tuple[_Engine, str], client: HttpxEngineClient, content: object
) -> None:
    state, url = engine
    with pytest.raises(TokenizeError, match="not encodable as JSON"):
        await client.tokenize_chat(
            url,
            "m",
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            chat_template_kwargs=None,
            timeout_s=5.0,
        )
    assert state.bodies == []


async def test_a_closed_port_is_a_connect_error_for_every_call(client: HttpxEngineClient) -> None:
    url = _closed_port_url()
    calls = [
        client.health(url, timeout_s=5.0),
        client.metrics_text(url, timeout_s=5.0),
        client.tokenize_prompt(url, "m", "x", add_special_tokens=True, timeout_s=5.0),
        client.post_stream(url, "/v1/completions", body=b"{}", headers={}),
    ]
    for call in calls:
        with pytest.raises(EngineConnectError, match=r"127\.0\.0\.1.*ConnectError") as info:
            await call
        cause = info.value.__cause__  # the lean client's (http://; https:// goes by httpx)
        assert isinstance(cause, HttpError) and cause.connect_failure


async def test_a_hanging_engine_fails_by_the_deadline(
    engine: tuple[_Engine, str], client: HttpxEngineClient
) -> None:
    _, url = engine
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(EngineResponseError, match=r"GET .*/hang/health: timed out after 0\.2 s"):
        await client.health(url + "/hang", timeout_s=0.2)
    with pytest.raises(EngineResponseError, match=r"POST .*/hang/tokenize: timed out after"):
        await client.tokenize_prompt(
            url + "/hang", "m", "x", add_special_tokens=True, timeout_s=0.2
        )
    assert loop.time() - started < DEADLINE_S


async def test_a_dripping_body_cannot_outlast_the_deadline(
    engine: tuple[_Engine, str], client: HttpxEngineClient
) -> None:
    # Bytes keep coming, so no per-phase read timeout fires; the whole call is still bounded.
    _, url = engine
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(EngineResponseError, match=r"timed out after 0\.3 s"):
        await client.metrics_text(url + "/drip", timeout_s=0.3)
    assert loop.time() - started < DEADLINE_S


async def test_post_stream_returns_at_the_headers_and_streams_the_body(
    engine: tuple[_Engine, str], client: HttpxEngineClient
) -> None:
    state, url = engine
    response = await client.post_stream(
        url + "/", "/v1/completions", body=b"hello", headers={"content-type": "application/json"}
    )
    try:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-engine-note"] == "a, b"  # repeated headers, comma-joined
        assert dict(response.headers.items())["x-engine-note"] == "a, b"
        chunks = response.aiter_raw()
        first = await chunks.__anext__()  # arrives while the engine holds back the rest
        assert first == b"data: first hello\n\n"
        state.second_chunk.set()
        assert b"".join([c async for c in chunks]) == b"data: second\n\n"
    finally:
        await response.aclose()


async def test_cancelling_post_stream_abandons_the_request(
    engine: tuple[_Engine, str], client: HttpxEngineClient
) -> None:
    state, url = engine
    call = asyncio.ensure_future(client.post_stream(url, "/wait", body=b"{}", headers={}))
    await asyncio.wait_for(state.waiting.wait(), DEADLINE_S)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.wait_for(state.client_left.wait(), DEADLINE_S)


async def test_post_stream_read_timeout_is_a_response_error(engine: tuple[_Engine, str]) -> None:
    _, url = engine
    async with _client(read_timeout_s=0.2) as client:
        with pytest.raises(EngineResponseError, match="ReadTimeout"):
            await client.post_stream(url + "/hang", "/x", body=b"{}", headers={})


class _BreakingEngine:
    """A raw HTTP/1.1 server: `/cut` sends headers and one chunk then closes, `/hang-up` closes
    without a word, `/stall` sends headers and one chunk then goes quiet."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.url = ""
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> _BreakingEngine:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        for writer in self._writers:
            writer.close()
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        path = head.split(" ", 2)[1]
        event = b"data: a\n\n"
        chunked = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        chunked += b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(event), event)
        if path == "/cut":
            writer.write(chunked)
        elif path == "/stall":
            writer.write(chunked)
            await writer.drain()
            self._writers.append(writer)
            return  # stays open, silent
        await writer.drain()
        writer.close()


async def test_a_stream_the_engine_breaks_off_raises_a_response_error_after_its_chunks() -> None:
    async with _BreakingEngine() as engine, _client() as client:
        response = await client.post_stream(engine.url, "/cut", body=b"{}", headers={})
        received: list[bytes] = []
        try:
            with pytest.raises(EngineResponseError, match=r"POST .*/cut: RemoteProtocolError"):
                async for chunk in response.aiter_raw():
                    received.append(chunk)
        finally:
            await response.aclose()
        assert b"".join(received) == b"data: a\n\n"


async def test_a_connection_closed_before_any_answer_is_a_response_error_not_a_connect_error() -> (
    None
):
    async with _BreakingEngine() as engine, _client() as client:
        with pytest.raises(EngineResponseError, match="RemoteProtocolError"):
            await client.post_stream(engine.url, "/hang-up", body=b"{}", headers={})


async def test_a_stalled_stream_fails_by_the_read_timeout() -> None:
    async with _BreakingEngine() as engine, _client(read_timeout_s=0.2) as client:
        response = await client.post_stream(engine.url, "/stall", body=b"{}", headers={})
        try:
            chunks = response.aiter_raw()
            assert await chunks.__anext__() == b"data: a\n\n"
            with pytest.raises(EngineResponseError, match="ReadTimeout"):
                await chunks.__anext__()
        finally:
            await response.aclose()


async def test_proxy_variables_in_the_environment_are_ignored(
    engine: tuple[_Engine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Engines sit on the cluster network: a proxy meant for the outside must not divert them.
    dead_proxy = _closed_port_url()
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    _, url = engine
    async with _client() as client:
        assert await client.health(url, timeout_s=5.0) == 200


async def test_many_concurrent_calls_share_the_pool(engine: tuple[_Engine, str]) -> None:
    _, url = engine
    async with _client(max_connections=2) as client:
        answers = await asyncio.gather(
            *(
                client.tokenize_prompt(url, "m", "a b", add_special_tokens=True, timeout_s=5.0)
                for _ in range(20)
            )
        )
        statuses = await asyncio.gather(*(client.health(url, timeout_s=5.0) for _ in range(20)))
    assert answers == [[0, 1]] * 20
    assert statuses == [200] * 20


async def test_probes_and_scrapes_are_not_starved_by_a_full_pool(
    engine: tuple[_Engine, str],
) -> None:
    # An overload can take every pooled connection; an engine must not be ejected for it.
    state, url = engine
    async with _client(max_connections=1) as client:
        held = asyncio.ensure_future(client.post_stream(url, "/wait", body=b"{}", headers={}))
        await asyncio.wait_for(state.waiting.wait(), DEADLINE_S)  # the one connection is taken
        try:
            assert await client.health(url, timeout_s=2.0) == 200
            assert "vllm:" in await client.metrics_text(url, timeout_s=2.0)
        finally:
            held.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await held


async def test_close_is_idempotent(engine: tuple[_Engine, str]) -> None:
    _, url = engine
    client = _client()
    assert await client.health(url, timeout_s=5.0) == 200
    await client.aclose()
    await client.aclose()
