"""`create_app(settings)`: the gateway's Starlette app; its lifespan builds the HTTP client,
fleet, index and subscribers, and closes them on shutdown."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from kvroute.gateway import handlers
from kvroute.gateway.openai_errors import GatewayHTTPError, error_response
from kvroute.gateway.service import Gateway
from kvroute.metrics import Metrics
from kvroute.settings import Settings

__all__ = ["create_app", "http_client"]

log = logging.getLogger("kvroute.gateway")


def http_client(settings: Settings) -> httpx.AsyncClient:
    """The one pooled client to engines (proxy, health, scrape, remote tokenizer)."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=settings.upstream_connect_timeout_s,
            read=settings.upstream_read_timeout_s,
            write=settings.upstream_read_timeout_s,
            pool=settings.upstream_read_timeout_s,
        ),
        limits=httpx.Limits(
            max_connections=settings.upstream_max_connections,
            max_keepalive_connections=settings.upstream_max_connections,
        ),
        # Engines sit on the cluster network; proxy variables meant for the outside world
        # must not divert that traffic.
        trust_env=False,
    )


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (no such path) and 405 (wrong method), in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    response = error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
    response.headers.update(exc.headers or {})
    return response


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    return error_response(500, f"internal error: {type(exc).__name__}", type="server_error")


def create_app(settings: Settings, *, metrics: Metrics | None = None) -> Starlette:
    """The gateway app; `app.state.gateway` holds the running `Gateway` between start and stop."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with http_client(settings) as client:
            gateway = Gateway.from_settings(
                settings, client, metrics if metrics is not None else Metrics()
            )
            try:
                await gateway.start()
                app.state.gateway = gateway
                yield
            finally:
                await gateway.close()

    routes = [
        Route("/v1/completions", handlers.completions, methods=["POST"]),
        Route("/v1/chat/completions", handlers.chat_completions, methods=["POST"]),
        Route("/v1/route", handlers.route, methods=["POST"]),
        Route("/v1/models", handlers.list_models, methods=["GET"]),
        Route("/metrics", handlers.metrics, methods=["GET"]),
        Route("/healthz", handlers.healthz, methods=["GET"]),
        Route("/readyz", handlers.readyz, methods=["GET"]),
        Route("/debug/engines", handlers.debug_engines, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            GatewayHTTPError: handlers.http_error,
            HTTPException: _http_exception,
            Exception: _internal_error,
        },
    )
