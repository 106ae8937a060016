"""The gateway's HTTP endpoints: OpenAI proxy routes, `/v1/route`, `/v1/models`, `/metrics`,
health and readiness, `/debug/engines`."""

from __future__ import annotations

import logging
import math
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kvroute.errors import ClientGone, GatewayHTTPError
from kvroute.gateway.exchange import REQUEST_ID_HEADER, Exchange, request_id
from kvroute.gateway.openai_body import RequestKind, read_body
from kvroute.gateway.openai_errors import http_error_response
from kvroute.gateway.proxy import proxy_request
from kvroute.gateway.service import Gateway

__all__ = [
    "chat_completions",
    "completions",
    "debug_engines",
    "healthz",
    "list_models",
    "metrics",
    "readyz",
    "route",
]

log = logging.getLogger("kvroute.gateway")


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def _read_body(request: Request, gateway: Gateway) -> bytes:
    try:
        return await read_body(request, gateway.max_body_bytes, gateway.body_timeout_s)
    except GatewayHTTPError as exc:
        if exc.status == 408:
            gateway.metrics.http_timeouts.labels(phase="body").inc()
        raise


async def _proxy(request: Request, kind: RequestKind | None) -> Response:
    """`kind` None: a passed-through endpoint (openai_body.PASSTHROUGH_PATHS), by its path."""
    gateway = _gateway(request)
    exchange = Exchange(
        gateway.metrics,
        request.method,
        request.url.path,
        request_id(request),
        log_access=gateway.access_log,
    )
    try:
        try:
            raw = await _read_body(request, gateway)
        except ClientGone:
            log.debug("client went away while sending its request")
            exchange.finish(499, "cancelled")
            return Response(status_code=499)
        prepared = (
            await gateway.prepare(kind, raw)
            if kind is not None
            else gateway.prepare_passthrough(request.url.path, raw)
        )
        req = prepared.request
        exchange.model = req.model
        outcome = await gateway.route(req, prepared.token_ids)
        exchange.policy = outcome.decision.policy
        exchange.prompt_tokens = outcome.prompt_tokens
        try:
            return await proxy_request(gateway, request, req, outcome, exchange)
        except ClientGone:
            log.debug("client went away before the engine answered")
            exchange.finish(499, "cancelled")
            return Response(status_code=499)
    except GatewayHTTPError as exc:  # refused or failed before an answer: still one access line
        exchange.finish(exc.status, "refused")
        raise


async def passthrough(request: Request) -> Response:
    """Embeddings, responses, tokenize and the engines' other JSON endpoints."""
    return await _proxy(request, None)


async def completions(request: Request) -> Response:
    return await _proxy(request, RequestKind.COMPLETION)


async def chat_completions(request: Request) -> Response:
    return await _proxy(request, RequestKind.CHAT)


async def route(request: Request) -> Response:
    """The decision and every engine's score, without proxying or speculative entries."""
    gateway = _gateway(request)
    try:
        raw = await _read_body(request, gateway)
    except ClientGone:
        log.debug("client went away while sending its request")
        return Response(status_code=499)
    prepared = await gateway.prepare(None, raw)  # chat when the body has `messages`
    outcome = await gateway.route(prepared.request, prepared.token_ids)
    return JSONResponse(outcome.route_json())


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": _gateway(request).fleet.models()})


async def metrics(request: Request) -> Response:
    """The registry as Prometheus text; state-backed gauges are read by its collectors."""
    body, content_type = _gateway(request).metrics.render()
    return Response(body, media_type=content_type)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready once at least one engine passes its health checks and every event source has
    bootstrapped (its engine's replay buffer is in the index) or run out of time to."""
    gateway = _gateway(request)
    engines = gateway.fleet.engines()
    healthy = sum(1 for e in engines if e.healthy)
    deadline_s = gateway.ready_bootstrap_deadline_s
    pending = gateway.subscribers.unsettled(deadline_s) if gateway.subscribers is not None else []
    ready = healthy > 0 and not pending
    return JSONResponse(
        {"ready": ready, "engines": len(engines), "healthy": healthy, "bootstrapping": pending},
        status_code=200 if ready else 503,
    )


async def debug_engines(request: Request) -> Response:
    """Per engine: health, load and the last scrape's `vllm:` gauges with their age; per source:
    connection, seq, lag, staleness, blocks."""
    gateway = _gateway(request)
    now = time.monotonic()
    statuses = gateway.subscribers.status() if gateway.subscribers is not None else []
    silent = gateway.silence.silent() if gateway.silence is not None else frozenset()
    by_engine: dict[str, list[dict[str, object]]] = {}
    for s in statuses:
        by_engine.setdefault(s.engine, []).append(
            {
                "source": s.source,
                "rank": s.rank,
                "endpoint": s.endpoint,
                "connected": s.connected,
                "last_seq": s.last_seq,
                "lag_s": s.last_batch_age_s,
                "stale": s.stale,
                "stale_reason": s.stale_reason,
                "blocks": s.blocks,
                # Nothing received for quiet_s; silent: so while the engine answered requests
                # (gateway/silence.py: a topic, endpoint or engine setting is wrong).
                "quiet_s": s.quiet_s,
                "silent": s.source in silent,
            }
        )
    engines = [
        {
            "name": e.spec.name,
            "model": e.spec.model,
            "url": e.spec.url,
            "healthy": e.healthy,
            "in_flight_requests": e.in_flight_requests,
            "served_requests": e.served_requests,
            "outstanding_tokens": e.outstanding_tokens,
            # What routing counts (load_source): the report, this replica's, the others'.
            "load": {
                "requests": (load := gateway.fleet.load(e)).requests,
                "tokens": load.tokens,
                "shared_requests": e.shared_requests,
                "shared_tokens": e.shared_tokens if e.shared_requests is not None else None,
            },
            # JSON has no infinities: an engine's +Inf gauge shows as null.
            "scraped": {k: v if math.isfinite(v) else None for k, v in e.scraped.items()},
            "scraped_age_s": None if e.scraped_at is None else now - e.scraped_at,
            "sources": by_engine.get(e.spec.name, []),
        }
        for e in gateway.fleet.engines()
    ]
    shared = gateway.shared
    return JSONResponse(
        {
            "policy": gateway.policy.name,
            "kv_event_sync": gateway.index is not None,
            "load_source": gateway.fleet.load_source.value,
            "shared_state": None
            if shared is None
            else {"replica": shared.replica_id, "up": shared.up, "peers": shared.peers},
            "engines": engines,
        }
    )


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayHTTPError)
    response = http_error_response(exc)
    rid = getattr(request.state, "request_id", None)
    if rid is not None:  # a proxied request's refusal carries its id like its answer would
        response.headers[REQUEST_ID_HEADER] = rid
    return response
