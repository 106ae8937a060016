"""Gateway under faults: unreachable engines, tokenizer failures, fleet file changes."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
import yaml

from kvroute.errors import TokenizeError
from kvroute.gateway import ENGINE_HEADER, BackgroundServer, Gateway, create_app
from kvroute.metrics import Metrics
from kvroute.settings import Settings, load_settings
from kvroute.sim import SimConfig, SimFleet
from tests.polling import eventually

MODEL = "sim-model"
DEADLINE_S = 10.0


def _refused_url() -> str:
    """A local port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _write(path: Path, entries: list[dict[str, object]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump({"engines": entries}, sort_keys=False))
    tmp.replace(path)


def _settings(fleet_file: Path, **extra: Any) -> Settings:
    options: dict[str, Any] = {
        "fleet_file": fleet_file,
        "port": 0,
        "health_interval_s": 0.2,
        "scrape_interval_s": 1.0,
        "watch_interval_s": 0.1,
        "log_level": "warning",
        **extra,
    }
    return load_settings(**options)


class _BrokenTokenizer:
    """A tokenizer whose backend is down: every call fails the way a real one reports it."""

    async def tokenize_prompt(self, model: str, prompt: str | list[int]) -> list[int]:
        raise TokenizeError("tokenizer backend unreachable")

    async def tokenize_chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        raise TokenizeError("tokenizer backend unreachable")


async def test_connect_failure_retries_once_on_the_next_best_engine(tmp_path: Path) -> None:
    async with SimFleet(2, MODEL, config=SimConfig(speed=20.0)) as fleet:
        path = tmp_path / "fleet.yaml"
        dead = {"name": "dead", "model": MODEL, "url": _refused_url(), "events": None}
        _write(path, [dead, *fleet.fleet_entries()])
        # Round robin sends every third request to the dead engine; probes are too slow
        # (60 s) to eject it first, so the proxy's retry is what saves those requests.
        settings = _settings(
            path, policy="round_robin", health_interval_s=60.0, unhealthy_after=100
        )
        async with (
            BackgroundServer(create_app(settings, metrics=Metrics())) as server,
            httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=30) as http,
        ):
            engines = []
            for i in range(6):
                response = await http.post(
                    "/v1/completions", json={"model": MODEL, "prompt": f"x {i}", "max_tokens": 2}
                )
                assert response.status_code == 200, response.text
                engines.append(response.headers[ENGINE_HEADER])
            assert "dead" not in engines
            metrics = (await http.get("/metrics")).text
            assert 'kvroute_upstream_retries_total{engine="dead"} 2.0' in metrics
            assert 'engine="dead",policy="round_robin",status="connect_error"' in metrics


async def test_no_healthy_engine_gets_503_in_openai_shape(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    _write(path, [{"name": "gone", "model": MODEL, "url": _refused_url(), "events": None}])
    settings = _settings(path, unhealthy_after=1)
    async with (
        BackgroundServer(create_app(settings, metrics=Metrics())) as server,
        httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=30) as http,
    ):

        async def ejected() -> bool:
            return (await http.get("/readyz")).status_code == 503

        await eventually(ejected, "the only engine ejected by its health probes")
        response = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "no_healthy_engine"


async def test_tokenizer_failure_routes_by_load_and_is_counted(tmp_path: Path) -> None:
    async with SimFleet(2, MODEL, config=SimConfig(speed=20.0)) as fleet:
        path = tmp_path / "fleet.yaml"
        fleet.write_fleet_file(path)
        app = create_app(_settings(path), metrics=Metrics())
        async with (
            BackgroundServer(app) as server,
            httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=30) as http,
        ):
            gateway: Gateway = app.state.gateway
            gateway.tokenizer = _BrokenTokenizer()
            response = await http.post(
                "/v1/chat/completions",
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 2,
                },
            )
            assert response.status_code == 200, response.text
            assert response.headers[ENGINE_HEADER].startswith("engine-")
            metrics = (await http.get("/metrics")).text
            assert "kvroute_tokenize_failures_total 1.0" in metrics


async def test_fleet_file_changes_add_and_remove_engines_and_their_sources(
    tmp_path: Path,
) -> None:
    async with SimFleet(3, MODEL, config=SimConfig(speed=20.0)) as fleet:
        path = tmp_path / "fleet.yaml"
        entries = fleet.fleet_entries()
        _write(path, entries[:2])
        async with (
            BackgroundServer(create_app(_settings(path), metrics=Metrics())) as server,
            httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=30) as http,
        ):

            async def names() -> set[str]:
                data = (await http.get("/debug/engines")).json()
                return {e["name"] for e in data["engines"] if e["sources"]}

            assert await names() == {"engine-0", "engine-1"}
            _write(path, entries)

            async def added() -> bool:
                return await names() == {"engine-0", "engine-1", "engine-2"}

            await eventually(added, "engine-2 added with its event source")
            _write(path, entries[1:])

            async def removed() -> bool:
                return await names() == {"engine-1", "engine-2"}

            await eventually(removed, "engine-0 and its source removed")
            models = (await http.get("/v1/models")).json()["data"]
            assert [m["id"] for m in models] == [MODEL]


async def test_readiness_waits_for_bootstrap_until_its_deadline(tmp_path: Path) -> None:
    # An engine that serves HTTP but whose event endpoint never answers: readiness waits for its
    # first bootstrap, then gives up on it at the deadline instead of waiting forever.
    async with SimFleet(1, MODEL, config=SimConfig(speed=50.0)) as fleet:
        (entry,) = fleet.fleet_entries()
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            dead = probe.getsockname()[1]
        entry = {
            **entry,
            "events": f"tcp://127.0.0.1:{dead}",
            "replay": f"tcp://127.0.0.1:{dead + 1}",
        }
        fleet_file = tmp_path / "fleet.yaml"
        fleet_file.write_text(yaml.safe_dump({"engines": [entry]}))
        settings = load_settings(
            fleet_file=fleet_file, port=0, health_interval_s=0.1, ready_bootstrap_deadline_s=5.0
        )
        async with (
            BackgroundServer(create_app(settings, metrics=Metrics())) as server,
            httpx.AsyncClient(base_url=server.url, timeout=10.0, trust_env=False) as http,
        ):
            first = await http.get("/readyz")
            assert first.status_code == 503, first.text
            assert first.json()["bootstrapping"] == [f"{entry['name']}/0"]
            await eventually(
                lambda: _status(http, "/readyz", 200),
                "ready once the deadline passed",
                timeout_s=20,
            )


async def _status(http: httpx.AsyncClient, path: str, expected: int) -> bool:
    return (await http.get(path)).status_code == expected
