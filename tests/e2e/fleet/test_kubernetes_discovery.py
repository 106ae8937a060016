"""The gateway with Kubernetes discovery: pods of simulated engines come and go on a stand-in API
server, the real client watches them, and requests route to whatever is Ready, with no restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from kvroute.gateway import BackgroundServer, create_app
from kvroute.metrics import Metrics
from kvroute.settings import load_settings
from kvroute.sim import SimConfig, SimFleet
from tests.k8s_apiserver import FakeApiServer, kubeconfig, pod
from tests.polling import eventually

MODEL = "sim/model"


def _pod(entry: dict[str, Any]) -> dict[str, Any]:
    """A pod for one simulated engine: everything on 127.0.0.1, the ports as annotations."""

    def port(endpoint: object) -> str:
        return str(endpoint).rsplit(":", 1)[1].rstrip("/")

    return pod(
        str(entry["name"]),
        "127.0.0.1",
        annotations={
            "kvroute.io/model": MODEL,
            "kvroute.io/port": port(entry["url"]),
            "kvroute.io/events-port": port(entry["events"]),
            "kvroute.io/replay-port": port(entry["replay"]),
        },
    )


async def test_pods_join_and_leave_the_routed_fleet_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    api = FakeApiServer()
    async with (
        SimFleet(2, MODEL, config=SimConfig(speed=20.0)) as fleet,
        BackgroundServer(api.app()) as apiserver,
    ):
        config = tmp_path / "kubeconfig"
        config.write_text(kubeconfig(apiserver.url))
        first, second = fleet.fleet_entries()
        api.put(_pod(first))
        settings = load_settings(
            k8s_namespace="ns",
            kubeconfig=config,
            port=0,
            health_interval_s=0.2,
            scrape_interval_s=1.0,
            log_level="warning",
        )
        async with (
            BackgroundServer(create_app(settings, metrics=Metrics())) as gateway,
            httpx.AsyncClient(base_url=gateway.url, timeout=30.0, trust_env=False) as http,
        ):

            async def engines() -> set[str]:
                data = (await http.get("/debug/engines")).json()
                return {e["name"] for e in data["engines"]}

            async def served_by(text: str) -> str:
                body = {"model": MODEL, "prompt": text, "max_tokens": 2}
                response = await http.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                return response.headers["x-kvroute-engine"]

            await eventually(lambda: _eq(engines(), {first["name"]}), "the first pod routed")
            assert await served_by("hello " * 40) == first["name"]

            api.put(_pod(second))
            await eventually(lambda: _eq(engines(), {first["name"], second["name"]}), "joined")
            api.delete(str(first["name"]))
            await eventually(lambda: _eq(engines(), {second["name"]}), "the first pod left")
            assert await served_by("another prompt " * 30) == second["name"]

            metrics = (await http.get("/metrics")).text
            assert "# TYPE kvroute_discovery_errors_total counter" in metrics
            assert "kvroute_discovery_errors_total{" not in metrics  # nothing went wrong


async def _eq(names: Any, expected: set[object]) -> bool:
    return bool(await names == expected)
