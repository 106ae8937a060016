"""What an operator sees of proxied requests (issue 15): latency histograms by engine and
policy, per-engine in-flight and scraped gauges, build and process metrics, no `_created`
series, one access line per request, and `x-request-id` passed through or made."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvroute import __version__
from kvroute.sim import SimFleet
from tests.polling import eventually
from tests.sim_gateway import MODEL, sim_gateway


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, SimFleet]]:
    async with sim_gateway(tmp_path, health_interval_s=0.2, scrape_interval_s=0.1) as stack:
        yield stack.http, stack.fleet


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_latency_histograms_gauges_build_and_process_metrics(
    gateway: tuple[httpx.AsyncClient, SimFleet],
) -> None:
    http, fleet = gateway
    prompt = fleet.tokenizer.make_text(64, seed="observe")
    plain = await http.post(
        "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 3}
    )
    assert plain.status_code == 200, plain.text
    engine = plain.headers["x-kvroute-engine"]
    async with http.stream(
        "POST",
        "/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": 3, "stream": True},
    ) as streamed:
        assert streamed.status_code == 200
        streamed_engine = streamed.headers["x-kvroute-engine"]
        _ = [chunk async for chunk in streamed.aiter_bytes()]

    async def scraped_usage_exported() -> bool:
        text = (await http.get("/metrics")).text
        return f'kvroute_engine_kv_cache_usage{{engine="{engine}"}}' in text

    await eventually(scraped_usage_exported, "the engines' scraped KV usage on /metrics")
    text = (await http.get("/metrics")).text
    samples = _samples(text)
    count = "_count"
    assert _value(
        samples, "kvroute_request_duration_seconds" + count, engine=engine, policy="kv_aware"
    ) == (2.0 if streamed_engine == engine else 1.0)
    assert (
        _value(
            samples,
            "kvroute_time_to_first_byte_seconds" + count,
            engine=streamed_engine,
            policy="kv_aware",
        )
        == 1.0
    )
    assert _value(samples, "kvroute_upstream_duration_seconds" + count, engine=engine)
    assert _value(samples, "kvroute_route_decision_seconds" + count, policy="kv_aware") == 2.0
    assert _value(samples, "kvroute_engine_in_flight_requests", engine=engine) == 0.0
    for name in ("kvroute_engine_running_requests", "kvroute_engine_waiting_requests"):
        assert _value(samples, name, engine=engine) is not None, name
    # sim_gateway's engines have 512 blocks, labelled on their vllm:cache_config_info
    assert _value(samples, "kvroute_engine_kv_pool_blocks", engine=engine) == 512.0
    build = [k for k in samples if k[0] == "kvroute_build_info"]
    assert build and ("version", __version__) in build[0][1]
    assert _value(samples, "process_resident_memory_bytes")
    assert not re.search(r"^\w+_created", text, re.MULTILINE), "a _created series is exported"


@pytest.mark.skipif(
    shutil.which("promtool") is None and os.environ.get("KVROUTE_REQUIRE_PROMETHEUS") != "1",
    reason="promtool absent: `make test-dashboard` installs Debian's prometheus",
)
async def test_promtool_finds_nothing_to_fix_on_a_live_metrics_page(
    gateway: tuple[httpx.AsyncClient, SimFleet],
) -> None:
    http, fleet = gateway
    body = {"model": MODEL, "prompt": fleet.tokenizer.make_text(32, seed="lint"), "max_tokens": 2}
    assert (await http.post("/v1/completions", json=body)).status_code == 200
    text = (await http.get("/metrics")).text
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
    )
    assert checked.returncode == 0 and not checked.stdout and not checked.stderr, (
        checked.stdout.decode() + checked.stderr.decode()
    )


async def test_one_access_line_per_request_with_its_id(
    gateway: tuple[httpx.AsyncClient, SimFleet], caplog: pytest.LogCaptureFixture
) -> None:
    http, fleet = gateway
    caplog.set_level(logging.INFO, logger="kvroute.access")
    prompt = fleet.tokenizer.make_text(64, seed="access")
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    given = await http.post("/v1/completions", json=body, headers={"x-request-id": "req-42"})
    assert given.status_code == 200 and given.headers["x-request-id"] == "req-42"
    made = await http.post("/v1/completions", json=body)
    assert made.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    refused = await http.post("/v1/completions", json={**body, "model": "no-such-model"})
    assert refused.status_code == 404 and refused.headers["x-request-id"]
    lines = [r for r in caplog.records if r.name == "kvroute.access"]
    assert [r.__dict__["request_id"] for r in lines] == [
        "req-42",
        made.headers["x-request-id"],
        refused.headers["x-request-id"],
    ]
    first = lines[0].__dict__
    assert first["status"] == 200 and first["model"] == MODEL
    assert first["engine"] == given.headers["x-kvroute-engine"] and first["policy"] == "kv_aware"
    assert first["prompt_tokens"] > 0 and first["matched_tokens"] is not None
    assert first["latency_ms"] > 0
    assert lines[0].getMessage() == "POST /v1/completions 200"
    assert lines[2].__dict__["status"] == 404 and lines[2].__dict__["engine"] is None


async def test_the_access_log_can_be_silenced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kvroute.access")
    async with sim_gateway(tmp_path, 1, num_gpu_blocks=128, access_log=False) as stack:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        ok = await stack.http.post("/v1/completions", json=body)
        assert ok.status_code == 200 and ok.headers["x-request-id"]
    assert not [r for r in caplog.records if r.name == "kvroute.access"]
