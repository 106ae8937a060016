"""Forward a routed request to its engine and stream the answer back chunk by chunk; a connect
failure before the first byte retries once on the next-best engine."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Final, Protocol

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from kvroute.core import EngineClient, EngineResponse
from kvroute.errors import ClientGone, EngineConnectError, EngineError, GatewayHTTPError
from kvroute.gateway.exchange import REQUEST_ID_HEADER, Exchange
from kvroute.gateway.openai_body import RoutingRequest
from kvroute.gateway.openai_errors import no_healthy_engine
from kvroute.gateway.outcome import RouteOutcome
from kvroute.metrics import Metrics

__all__ = ["ENGINE_HEADER", "HeaderRules", "ProxyContext", "proxy_request"]

log = logging.getLogger("kvroute.gateway.proxy")

ENGINE_HEADER: Final = "x-kvroute-engine"
# Hop-by-hop headers (RFC 9110 §7.6.1) and those the proxy recomputes are never forwarded.
_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# Headers our own server sets on every response; the engine's copies would be duplicates.
_SERVER_OWN: Final = frozenset({"date", "server"})


@dataclass(frozen=True, slots=True)
class HeaderRules:
    """Which client headers reach the engines: `strip` (lower-case names) never do, and
    `authorization`, when set, replaces the client's `Authorization` (the engines' own API
    key, so a client's credentials for the gateway never reach whichever engine wins)."""

    strip: frozenset[str] = frozenset({"cookie"})
    authorization: str | None = None


class ProxyContext(Protocol):
    """What the proxy needs from the running gateway (gateway/service.py's Gateway has it)."""

    @property
    def client(self) -> EngineClient: ...

    @property
    def header_rules(self) -> HeaderRules: ...

    @property
    def metrics(self) -> Metrics: ...

    def engine_url(self, engine: str) -> str | None:
        """`engine`'s base URL; None when it left the fleet."""
        ...

    def next_engine(self, ranked: Sequence[str], tried: AbstractSet[str]) -> str | None:
        """The first of `ranked` not in `tried` that is still in the fleet and healthy."""
        ...

    def begin_request(self, engine: str, tokens: int) -> None: ...

    def end_request(self, engine: str, tokens: int) -> None: ...

    def note_served(self, engine: str) -> None:
        """`engine` answered a request with a status below 400."""
        ...

    def mark_failure(self, engine: str) -> None:
        """`engine` refused a connection: one step toward ejecting it."""
        ...

    def add_speculative(self, engine: str, outcome: RouteOutcome, cache_salt: str | None) -> None:
        """Claim the routed prompt's blocks for `engine` until its events confirm them."""
        ...


async def _send_until_disconnect(
    request: Request, send: Awaitable[EngineResponse]
) -> EngineResponse:
    """Await `send` (the engine's status and headers), cancelling it and raising ClientGone if
    the client disconnects first (a non-streamed answer comes only when complete)."""
    task = asyncio.ensure_future(send)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we were cancelled ourselves: cancel the call too
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with anyio.CancelScope(shield=True):
        (done,) = await asyncio.gather(task, return_exceptions=True)
        if not isinstance(done, BaseException):  # answered while being cancelled
            await done.aclose()
    raise ClientGone()


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _forward_headers(request: Request, rules: HeaderRules) -> dict[str, str]:
    strip = rules.strip
    headers = {
        k: v
        for k, v in request.headers.items()
        if (name := k.lower()) not in _HOP_BY_HOP and name not in strip
    }
    headers["content-type"] = "application/json"
    if rules.authorization is not None:
        for name in [k for k in headers if k.lower() == "authorization"]:
            del headers[name]
        headers["authorization"] = rules.authorization
    return headers


async def proxy_request(
    ctx: ProxyContext,
    request: Request,
    req: RoutingRequest,
    outcome: RouteOutcome,
    exchange: Exchange,
) -> Response:
    """Send `req` to the chosen engine (retrying once on a connect failure) and relay the answer."""
    policy = outcome.decision.policy
    ranked = outcome.decision.ranked
    headers = _forward_headers(request, ctx.header_rules)
    headers[REQUEST_ID_HEADER] = exchange.request_id  # the client's, or the one made for it
    tokens = outcome.prompt_tokens + req.max_tokens
    engine: str | None = outcome.decision.engine
    tried: set[str] = set()
    while engine is not None:
        tried.add(engine)
        base_url = ctx.engine_url(engine)
        if base_url is None:  # removed from the fleet since the decision
            engine = ctx.next_engine(ranked, tried)
            continue
        ctx.begin_request(engine, tokens)
        ctx.add_speculative(engine, outcome, req.cache_salt)
        match = outcome.matches.get(engine)
        exchange.sent_upstream(engine, match.tokens if match is not None else 0)
        try:
            upstream = await _send_until_disconnect(
                request,
                ctx.client.post_stream(base_url, req.upstream_path, body=req.raw, headers=headers),
            )
        except EngineConnectError as exc:  # the engine never saw it: retrying elsewhere is safe
            ctx.end_request(engine, tokens)
            ctx.mark_failure(engine)
            ctx.metrics.requests.labels(engine, policy, "connect_error").inc()
            failed, engine = engine, ctx.next_engine(ranked, tried)
            if engine is None or len(tried) >= 2:
                exchange.finish(502, "connect_error")
                raise GatewayHTTPError(
                    502,
                    f"engine {failed!r} unreachable: {exc}",
                    type="upstream_error",
                    code="engine_unreachable",
                ) from exc
            ctx.metrics.upstream_retries.labels(failed).inc()
            log.info(
                "connect failure; retrying on next-best engine",
                extra={"engine": failed, "retry_engine": engine, "error": str(exc)},
            )
            continue
        except EngineError as exc:
            ctx.end_request(engine, tokens)
            ctx.metrics.requests.labels(engine, policy, "upstream_error").inc()
            exchange.finish(502, "upstream_error")
            raise GatewayHTTPError(
                502,
                f"engine {engine!r} failed before answering: {exc}",
                type="upstream_error",
                code="engine_error",
            ) from exc
        except BaseException:  # ClientGone, cancellation
            ctx.end_request(engine, tokens)
            ctx.metrics.requests.labels(engine, policy, "cancelled").inc()
            exchange.finish(499, "cancelled")
            raise
        if upstream.status_code < 400 and not req.path:  # a generation: it stores blocks
            ctx.note_served(engine)
        ctx.metrics.prompt_tokens.labels(engine).inc(outcome.prompt_tokens)
        if match is not None and match.tokens:
            ctx.metrics.prefix_hit_tokens.labels(engine).inc(match.tokens)
        if _is_sse(upstream):
            return _relay(ctx, upstream, engine, policy, tokens, exchange)
        return await _buffered(ctx, upstream, engine, policy, tokens, exchange)
    raise no_healthy_engine(req.model)


def _is_sse(upstream: EngineResponse) -> bool:
    return upstream.headers.get("content-type", "").startswith("text/event-stream")


def _response_headers(upstream: EngineResponse, engine: str, request_id: str) -> dict[str, str]:
    headers = {
        k: v
        for k, v in upstream.headers.items()
        if (name := k.lower()) not in _HOP_BY_HOP
        and name not in _SERVER_OWN
        and name != REQUEST_ID_HEADER
    }
    headers[ENGINE_HEADER] = engine
    headers[REQUEST_ID_HEADER] = request_id
    return headers


async def _buffered(
    ctx: ProxyContext,
    upstream: EngineResponse,
    engine: str,
    policy: str,
    tokens: int,
    exchange: Exchange,
) -> Response:
    """A non-streamed answer, read whole before it is relayed (the engine sends it complete), so
    an engine that breaks off mid-body gets the client a 502, not a cut 200."""
    label = "cancelled"
    try:
        content = b"".join([chunk async for chunk in upstream.aiter_raw()])
        label = str(upstream.status_code)
    except EngineError as exc:
        label = "upstream_error"
        raise GatewayHTTPError(
            502,
            f"engine {engine!r} broke off its answer: {exc}",
            type="upstream_error",
            code="engine_error",
        ) from exc
    finally:
        ctx.end_request(engine, tokens)
        ctx.metrics.requests.labels(engine, policy, label).inc()
        status = {"cancelled": 499, "upstream_error": 502}.get(label, upstream.status_code)
        exchange.finish(status, label)
        with anyio.CancelScope(shield=True):
            await upstream.aclose()
    return Response(
        content,
        status_code=upstream.status_code,
        headers=_response_headers(upstream, engine, exchange.request_id),
    )


def _relay(
    ctx: ProxyContext,
    upstream: EngineResponse,
    engine: str,
    policy: str,
    tokens: int,
    exchange: Exchange,
) -> StreamingResponse:
    """A streamed (SSE) answer, relayed chunk by chunk as the engine sends it."""
    label = str(upstream.status_code)
    completed = False

    async def body() -> AsyncGenerator[bytes, None]:
        nonlocal label, completed
        try:
            async for chunk in upstream.aiter_raw():
                exchange.first_byte()  # after the first, a None check
                yield chunk
            completed = True
        except EngineError as exc:
            # Headers are sent already: end the stream early and count it. A streaming client
            # gets an OpenAI error event (as vLLM sends one), so its SDK raises instead of
            # taking the cut answer for a whole one.
            label = "upstream_error"
            log.info("engine stream broke", extra={"engine": engine, "error": str(exc)})
            yield _sse_error(f"engine {engine!r} stream broke: {exc}")

    stream = body()

    async def close() -> None:
        nonlocal label
        if label != "upstream_error" and not completed:
            label = "cancelled"  # the client went away mid-answer
        ctx.end_request(engine, tokens)
        ctx.metrics.requests.labels(engine, policy, label).inc()
        # The status line went out with the engine's status; the outcome says how it ended.
        exchange.finish(upstream.status_code, label)
        await stream.aclose()
        await upstream.aclose()

    return _RelayResponse(
        stream,
        close,
        status_code=upstream.status_code,
        headers=_response_headers(upstream, engine, exchange.request_id),
    )


def _sse_error(message: str) -> bytes:
    """An SSE event carrying an OpenAI error object; the blank line first ends a cut event."""
    error = {"message": message, "type": "upstream_error", "param": None, "code": "engine_error"}
    return b"\n\ndata: " + json.dumps({"error": error}).encode() + b"\n\n"


class _RelayResponse(StreamingResponse):
    """A StreamingResponse that always closes its upstream, also when the client went away."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[], Awaitable[None]],
        *,
        status_code: int,
        headers: dict[str, str],
    ) -> None:
        super().__init__(content, status_code=status_code, headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()
