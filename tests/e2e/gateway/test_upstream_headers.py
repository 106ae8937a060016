"""Which client headers reach the engine: hop-by-hop never, `Cookie` not by default, and with
`engine_api_key_file` the engines' own key replaces the client's `Authorization`."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from kvroute.errors import ConfigError
from kvroute.gateway import BackgroundServer, create_app
from kvroute.metrics import Metrics
from kvroute.settings import load_settings

MODEL = "echo-model"


def _engine(seen: list[dict[str, str]]) -> Starlette:
    """An engine that answers every completion and remembers the headers it was sent."""

    async def completions(request: Request) -> JSONResponse:
        seen.append(dict(request.headers))
        return JSONResponse({"id": "cmpl-1", "object": "text_completion", "choices": []})

    async def health(_request: Request) -> PlainTextResponse:
        return PlainTextResponse("")

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/health", health),
            Route("/metrics", health),
        ]
    )


@pytest.mark.parametrize("engine_key", [None, "engine-key-123"])
async def test_client_headers_reach_the_engine_only_as_configured(
    tmp_path: Path, engine_key: str | None
) -> None:
    seen: list[dict[str, str]] = []
    key_file = None
    if engine_key is not None:
        key_file = tmp_path / "engine-key"
        key_file.write_text(engine_key + "\n")
    async with BackgroundServer(_engine(seen)) as engine:
        fleet_file = tmp_path / "fleet.yaml"
        fleet_file.write_text(
            yaml.safe_dump({"engines": [{"name": "e", "model": MODEL, "url": engine.url}]})
        )
        settings = load_settings(
            fleet_file=fleet_file,
            port=0,
            log_level="warning",
            kv_event_sync_enabled=False,
            engine_api_key_file=key_file,
            strip_client_headers="Cookie, X-Internal-Secret",
        )
        async with (
            BackgroundServer(create_app(settings, metrics=Metrics())) as gateway,
            httpx.AsyncClient(base_url=gateway.url, trust_env=False, timeout=30) as http,
        ):
            reply = await http.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
                headers={
                    "Authorization": "Bearer client-key",
                    "Cookie": "session=abc",
                    "X-Internal-Secret": "x",
                    "X-Request-Id": "r-1",
                    "Proxy-Authorization": "Basic Zm9vOmJhcg==",
                },
            )
            assert reply.status_code == 200, reply.text
    [headers] = seen
    assert headers["x-request-id"] == "r-1"  # ordinary headers pass
    assert "cookie" not in headers and "x-internal-secret" not in headers
    assert "proxy-authorization" not in headers  # hop-by-hop
    expected = "Bearer client-key" if engine_key is None else f"Bearer {engine_key}"
    assert headers["authorization"] == expected


def test_an_unreadable_engine_key_file_is_a_one_line_error(tmp_path: Path) -> None:
    settings = load_settings(port=0, engine_api_key_file=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="engine_api_key_file: cannot read"):
        create_app(settings, metrics=Metrics())
