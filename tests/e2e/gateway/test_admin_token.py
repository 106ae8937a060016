"""The admin token (`admin_token_file`): `/v1/route` and `/debug/*` (and `/metrics` when asked)
answer 401 without it; the OpenAI endpoints and the probes stay open; bad set-ups are one-line
errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from kvroute.errors import ConfigError
from kvroute.gateway import BackgroundServer, create_app
from kvroute.metrics import Metrics
from kvroute.settings import load_settings
from kvroute.sim import SimConfig, SimFleet

MODEL = "sim-model"
TOKEN = "s3cret-token"


@pytest.fixture
async def fleet_file(tmp_path: Path) -> AsyncIterator[Path]:
    async with SimFleet(1, MODEL, config=SimConfig(speed=50.0)) as fleet:
        fleet.write_fleet_file(tmp_path / "fleet.yaml")
        yield tmp_path / "fleet.yaml"


@pytest.mark.parametrize("metrics_require_token", [False, True])
async def test_operator_endpoints_need_the_token_and_the_rest_stays_open(
    fleet_file: Path, tmp_path: Path, metrics_require_token: bool
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")  # as a mounted secret often ends
    settings = load_settings(
        fleet_file=fleet_file,
        port=0,
        log_level="warning",
        admin_token_file=token_file,
        metrics_require_token=metrics_require_token,
    )
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 1}
    good = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        BackgroundServer(create_app(settings, metrics=Metrics())) as server,
        httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=30) as http,
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            denied = await http.post("/v1/route", json=body, headers=headers)
            assert denied.status_code == 401, denied.text
            error = denied.json()["error"]
            assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
            assert (await http.get("/debug/engines", headers=headers)).status_code == 401
        assert (await http.post("/v1/route", json=body, headers=good)).status_code == 200
        assert (await http.get("/debug/engines", headers=good)).status_code == 200
        metrics = await http.get("/metrics")
        assert metrics.status_code == (401 if metrics_require_token else 200)
        assert (await http.get("/metrics", headers=good)).status_code == 200
        # Clients of the OpenAI API and the probes need no admin token.
        assert (await http.post("/v1/completions", json=body)).status_code == 200
        assert (await http.get("/v1/models")).status_code == 200
        assert (await http.get("/healthz")).status_code == 200


def test_a_missing_or_empty_token_file_and_a_token_less_metrics_guard_are_refused(
    tmp_path: Path,
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    for overrides, message in (
        ({"admin_token_file": tmp_path / "nowhere"}, "admin_token_file: cannot read"),
        ({"admin_token_file": empty}, "admin_token_file:"),
        ({"metrics_require_token": True}, "metrics_require_token: needs admin_token_file"),
    ):
        settings = load_settings(port=0, log_level="warning", **overrides)
        with pytest.raises(ConfigError, match=message):
            create_app(settings, metrics=Metrics())
