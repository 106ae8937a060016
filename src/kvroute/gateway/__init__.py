"""The HTTP service: OpenAI-compatible proxy with streaming, `/v1/route`, `/v1/models`,
`/metrics`, health, readiness and debug endpoints, built by `create_app(settings)`."""

from kvroute.gateway.app import create_app
from kvroute.gateway.outcome import RouteOutcome
from kvroute.gateway.proxy import ENGINE_HEADER
from kvroute.gateway.server import BackgroundServer, ServerOptions, serve_forever
from kvroute.gateway.service import Gateway

__all__ = [
    "ENGINE_HEADER",
    "BackgroundServer",
    "Gateway",
    "RouteOutcome",
    "ServerOptions",
    "create_app",
    "serve_forever",
]
