"""Gateway wiring (gateway/app.py `build_gateway`): what the settings switch on and off, what
is attached to the metrics, and the scraped gauges on `/debug/engines`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from kvroute.core import PolicyName
from kvroute.errors import ConfigError
from kvroute.gateway import BackgroundServer, create_app
from kvroute.gateway.app import build_gateway
from kvroute.metrics import Metrics
from kvroute.settings import load_settings
from kvroute.tokenize import CachingTokenizer, RemoteTokenizer
from kvroute.upstream import HttpxEngineClient
from tests.engine_clients import engine_client
from tests.polling import eventually


@pytest.fixture
async def client() -> AsyncIterator[HttpxEngineClient]:
    async with engine_client(timeout_s=1.0) as c:
        yield c


async def test_kv_event_sync_disabled_degrades_kv_aware_to_least_loaded_logged_once(
    caplog: pytest.LogCaptureFixture, client: HttpxEngineClient
) -> None:
    settings = load_settings(kv_event_sync_enabled=False)
    with caplog.at_level(logging.INFO, logger="kvroute"):
        gateway = build_gateway(settings, client, Metrics())
        await gateway.start()
        await gateway.close()
    assert (gateway.policy.name, gateway.index, gateway.subscribers) == ("least_loaded", None, None)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "KV event sync disabled: no subscribers, kv_aware routes as least_loaded"
    ]


@pytest.mark.parametrize(
    "policy", [PolicyName.ROUND_ROBIN, PolicyName.RANDOM, PolicyName.LEAST_LOADED]
)
async def test_kv_event_sync_disabled_keeps_a_load_only_policy_silently(
    caplog: pytest.LogCaptureFixture, client: HttpxEngineClient, policy: PolicyName
) -> None:
    settings = load_settings(kv_event_sync_enabled=False, policy=policy)
    with caplog.at_level(logging.WARNING, logger="kvroute"):
        gateway = build_gateway(settings, client, Metrics())
    assert gateway.policy.name == policy and gateway.index is None
    assert not caplog.records


async def test_kv_event_sync_enabled_builds_the_index_and_subscribers(
    client: HttpxEngineClient,
) -> None:
    gateway = build_gateway(load_settings(), client, Metrics())
    try:
        assert gateway.policy.name == "kv_aware"
        assert gateway.index is not None and gateway.subscribers is not None
    finally:
        await gateway.close()


@pytest.mark.parametrize(("size", "cached"), [(8, True), (0, False)])
async def test_remote_tokenizer_sits_behind_the_cache_unless_its_size_is_zero(
    client: HttpxEngineClient, size: int, cached: bool
) -> None:
    gateway = build_gateway(load_settings(tokenizer_cache_size=size), client, Metrics())
    try:
        assert isinstance(gateway.tokenizer, CachingTokenizer) is cached
        if not cached:
            assert isinstance(gateway.tokenizer, RemoteTokenizer)
    finally:
        await gateway.close()


async def test_fleet_health_and_reloads_are_exported_at_scrape_time(
    client: HttpxEngineClient, tmp_path: Path
) -> None:
    path = tmp_path / "fleet.yaml"
    engines = [{"name": n, "model": "m", "url": f"http://{n}:8000"} for n in ("a", "b")]
    path.write_text(yaml.safe_dump({"engines": engines}))
    metrics = Metrics()
    gateway = build_gateway(
        load_settings(fleet_file=path, kv_event_sync_enabled=False, unhealthy_after=1),
        client,
        metrics,
    )
    try:
        gateway.fleet.mark_failure("b")
        gateway.fleet.reloads["ok"] += 1  # as the fleet file source counts a reload
        text = generate_latest(metrics.registry).decode()
        assert 'kvroute_engine_healthy{engine="a"} 1.0' in text
        assert 'kvroute_engine_healthy{engine="b"} 0.0' in text
        assert 'kvroute_fleet_reloads_total{outcome="ok"} 1.0' in text
        await gateway.fleet.update([gateway.fleet.specs()[0]])  # b leaves: its gauge goes too
        assert 'engine="b"' not in generate_latest(metrics.registry).decode()
    finally:
        await gateway.close()


async def test_debug_engines_shows_the_scraped_gauges_with_infinities_as_null(
    tmp_path: Path,
) -> None:
    async def health(request: Request) -> Response:
        return Response()

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(
            "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 3\n"
            "# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc +Inf\n"
        )

    engine = Starlette(routes=[Route("/health", health), Route("/metrics", metrics)])
    async with BackgroundServer(engine) as engine_server:
        path = tmp_path / "fleet.yaml"
        entry = {"name": "a", "model": "m", "url": engine_server.url}
        path.write_text(yaml.safe_dump({"engines": [entry]}))
        settings = load_settings(
            fleet_file=path, kv_event_sync_enabled=False, scrape_interval_s=0.05
        )
        async with (
            BackgroundServer(create_app(settings, metrics=Metrics())) as server,
            httpx.AsyncClient(base_url=server.url, trust_env=False) as http,
        ):

            async def scraped() -> bool:
                data = (await http.get("/debug/engines")).json()
                return bool(data["engines"][0]["scraped"])

            await eventually(scraped, "the first scrape on /debug/engines")
            (state,) = (await http.get("/debug/engines")).json()["engines"]
            assert state["scraped"] == {
                "vllm:num_requests_running": 3.0,
                "vllm:kv_cache_usage_perc": None,
            }
            assert state["scraped_age_s"] >= 0.0


async def test_kubernetes_discovery_with_a_missing_kubeconfig_fails_at_build(
    client: HttpxEngineClient, tmp_path: Path
) -> None:
    settings = load_settings(k8s_namespace="ns", kubeconfig=tmp_path / "absent")
    with pytest.raises(ConfigError, match="kubeconfig: expected a kubeconfig file"):
        build_gateway(settings, client, Metrics())


def test_serve_with_an_unreadable_admin_token_says_so_in_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from kvroute.cli import main

    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        yaml.safe_dump({"engines": [{"name": "e0", "url": "http://127.0.0.1:1", "model": "m"}]})
    )
    monkeypatch.setenv("KVROUTE_ADMIN_TOKEN_FILE", str(tmp_path / "absent"))
    assert main(["serve", "--fleet", str(fleet), "--port", "0"]) == 2  # before binding a port
    err = capsys.readouterr().err
    assert err.startswith("kvroute serve: admin_token_file: cannot read"), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_serve_without_a_fleet_source_says_both_ways_to_give_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvroute.cli import main

    monkeypatch.delenv("KVROUTE_FLEET_FILE", raising=False)
    monkeypatch.delenv("KVROUTE_K8S_NAMESPACE", raising=False)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "--fleet" in err and "--k8s-namespace" in err and "Traceback" not in err
