"""The Grafana dashboard (deploy/grafana/kvroute-dashboard.json) against a real Prometheus: it
scrapes a running gateway in front of simulated engines under load, and every PromQL expression
of every panel, evaluated through Prometheus's HTTP API, must return data (issue 15).

`make test-dashboard` installs Debian's `prometheus` when it is missing; elsewhere the test is
skipped when the binary is absent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kvroute.bench.processes import free_port
from kvroute.sim import SimFleet
from tests.polling import eventually
from tests.sim_gateway import MODEL, sim_gateway

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "kvroute-dashboard.json"
PROMETHEUS = shutil.which("prometheus")
# What Grafana would put for the dashboard's variables: every job, a window holding several
# of this test's one-second scrapes.
VARIABLES = {"$__rate_interval": "30s", "$job": ".*"}

# `make test-dashboard` sets it: there a missing Prometheus fails instead of skipping.
REQUIRED = os.environ.get("KVROUTE_REQUIRE_PROMETHEUS") == "1"

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None and not REQUIRED,
    reason="prometheus absent: `make test-dashboard` installs it",
)


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, expression) for every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


def test_the_dashboard_is_grafana_json_with_a_query_on_every_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel.get("targets"), panel["title"]
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("hit rate", "latency", "engine", "drops", "replays", "stale", "index"):
        assert topic in titles, topic


@contextlib.contextmanager
def prometheus(tmp_path: Path, target: str) -> Iterator[str]:
    """A real Prometheus scraping `target` (host:port) every second; yields its base URL."""
    assert PROMETHEUS is not None, "prometheus is not installed (Debian package prometheus)"
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "kvroute", "static_configs": [{"targets": [target]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[str, SimFleet]]:
    async with sim_gateway(
        tmp_path, num_gpu_blocks=256, host="127.0.0.1", scrape_interval_s=0.2, log_level="warning"
    ) as stack:
        yield stack.url, stack.fleet


async def _load(url: str, fleet: SimFleet) -> None:
    """Completions and chats, streamed and not, on shared prefixes, until cancelled."""
    shared = fleet.tokenizer.make_text(96, seed="dashboard-shared")
    async with httpx.AsyncClient(base_url=url, timeout=30.0, trust_env=False) as http:
        i = 0
        while True:
            i += 1
            body: dict[str, Any] = {
                "model": MODEL,
                "prompt": f"{shared} {i % 5}",
                "max_tokens": 4,
                "stream": i % 2 == 0,
            }
            response = await http.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            await asyncio.sleep(0.05)  # pacing the load, not waiting for anything


async def test_every_panel_query_returns_data_from_a_real_prometheus(
    tmp_path: Path, gateway: tuple[str, SimFleet]
) -> None:
    url, fleet = gateway
    load = asyncio.create_task(_load(url, fleet))
    try:
        with prometheus(tmp_path, url.removeprefix("http://")) as prom:
            async with httpx.AsyncClient(base_url=prom, timeout=10.0, trust_env=False) as api:

                async def query(expr: str) -> list[Any]:
                    response = await api.get("/api/v1/query", params={"query": expr})
                    body = response.json()
                    assert body.get("status") == "success", (expr, body)
                    result: list[Any] = body["data"]["result"]
                    return result

                async def scraped_enough() -> bool:
                    assert not load.done() or load.exception() is None, load.exception()
                    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                        rows = await query('count_over_time(up{job="kvroute"}[30s])')
                        return bool(rows) and float(rows[0]["value"][1]) >= 5
                    return False

                await eventually(
                    scraped_enough,
                    "Prometheus scraped the gateway 5 times",
                    timeout_s=90.0,
                    interval_s=0.5,
                )
                up = await query('up{job="kvroute"}')
                assert up and up[0]["value"][1] == "1", up
                empty = []
                for title, expr in panel_queries():
                    rows = await query(expr)
                    if not rows:
                        empty.append(f"{title}: {expr}")
                assert not empty, "panel queries without data:\n" + "\n".join(empty)
    finally:
        load.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await load
        log = tmp_path / "prometheus.log"
        if log.exists():
            print(log.read_text(errors="replace")[-4000:])  # shown when the test fails
