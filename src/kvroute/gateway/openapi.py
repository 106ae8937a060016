"""The OpenAPI 3 document of kvroute's own HTTP endpoints, served at `GET /openapi.json`
(tests/e2e/gateway/test_openapi_fuzz.py drives schemathesis from it)."""

from __future__ import annotations

from typing import Any, Final

from kvroute import __version__
from kvroute.gateway.openai_body import PASSTHROUGH_PATHS

__all__ = ["openapi_document"]

_JSON: Final = "application/json"
_TOKEN_ID: Final = {"type": "integer", "minimum": 0, "maximum": 4294967295}
_ERROR: Final = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}
_COMMON: Final = {
    "model": {"type": "string", "minLength": 1, "description": "a model the fleet serves"},
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 2147483647},
    "stream": {"type": "boolean"},
    "cache_salt": {"type": "string", "description": "isolates tenants' cached prefixes"},
}
_COMPLETION: Final = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        **_COMMON,
        "prompt": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": _TOKEN_ID, "minItems": 1},
                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
            ]
        },
    },
    "description": "OpenAI's completion request; every other field is forwarded unchanged.",
}
_CHAT: Final = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        **_COMMON,
        "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": 2147483647},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"type": "string", "enum": ["system", "user", "assistant"]},
                    "content": {"type": "string"},
                },
            },
        },
    },
    "description": "OpenAI's chat request; every other field is forwarded unchanged.",
}
_ROUTE: Final = {
    "type": "object",
    "required": ["engine", "policy", "prompt_tokens", "engines"],
    "properties": {
        "engine": {"type": "string"},
        "policy": {"type": "string"},
        "prompt_tokens": {"type": "integer"},
        "engines": {"type": "array", "items": {"type": "object"}},
    },
}


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(s): {"description": "an OpenAI-shaped error", "content": {_JSON: {"schema": _ERROR}}}
        for s in statuses
    }


# A passed-through body: the engine checks the rest; kvroute needs the model.
_PASSTHROUGH: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["model"],
    "properties": {"model": {"type": "string", "minLength": 1}},
}


def _post(summary: str, body: dict[str, Any], ok: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {_JSON: {"schema": body}}},
            "responses": {"200": ok, **_errors(400, 401, 404, 413, 502, 503)},
        }
    }


def _get(summary: str, ok: dict[str, Any], *errors: int) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": ok, **_errors(*errors)}}}


def openapi_document() -> dict[str, Any]:
    """The document (a fresh dict: callers may change their copy)."""
    proxied = {
        "description": "the engine's answer, passed through (JSON, or SSE when streaming)",
        "content": {_JSON: {"schema": {"type": "object"}}, "text/event-stream": {}},
    }
    json_object = {"description": "JSON", "content": {_JSON: {"schema": {"type": "object"}}}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "kvroute",
            "version": __version__,
            "description": "A KV-cache-aware router in front of vLLM engines (README.md).",
        },
        "paths": {
            "/v1/completions": _post("Route and proxy a completion", _COMPLETION, proxied),
            "/v1/chat/completions": _post("Route and proxy a chat completion", _CHAT, proxied),
            "/v1/route": _post(
                "The routing decision and every engine's score, without proxying",
                {"oneOf": [_COMPLETION, _CHAT]},
                {"description": "the decision", "content": {_JSON: {"schema": _ROUTE}}},
            ),
            "/v1/models": _get("The fleet's models and adapters", json_object),
            "/metrics": _get(
                "Prometheus metrics",
                {"description": "text exposition format", "content": {"text/plain": {}}},
                401,
            ),
            "/healthz": _get("Liveness", json_object),
            "/readyz": _get("Readiness", json_object, 503),
            "/debug/engines": _get("Sources and engines as kvroute sees them", json_object, 401),
            "/openapi.json": _get("This document", json_object),
            **{
                path: _post(
                    "Passed through to an engine of the body's model (by prefix with a prompt)",
                    _PASSTHROUGH,
                    proxied,
                )
                for path in PASSTHROUGH_PATHS
            },
        },
    }
