"""kvroute's HTTP surface fuzzed from its own OpenAPI document (`GET /openapi.json`) with
schemathesis: valid and invalid requests to every endpoint of a `kvroute serve` in front of
simulated engines; never a 5xx of kvroute's own, and every answer of the documented shape."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kvroute.bench.processes import free_port  # noqa: E402

MODEL = "sim-model"
EXAMPLES = int(os.environ.get("KVROUTE_OPENAPI_FUZZ_EXAMPLES", "30"))
DEADLINE_S = 60.0


def _wait(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)  # polling a child process that is starting, not synchronisation
    raise AssertionError(f"{url} never ready: {log.read_text(errors='replace')[-2000:]}")


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("openapi")
    fleet_file = tmp / "fleet.yaml"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sim_log, gw_log = tmp / "sim.log", tmp / "gateway.log"
    sim_out, gw_out = sim_log.open("wb"), gw_log.open("wb")
    sim = subprocess.Popen(
        [sys.executable, "-m", "kvroute.cli", "sim", "--engines", "2", "--model", MODEL,
         "--speed", "200", "--fleet-out", str(fleet_file)],
        stdout=sim_out, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    port = free_port()
    gateway: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not fleet_file.exists():
            assert sim.poll() is None and time.monotonic() < deadline, sim_log.read_text()
            time.sleep(0.05)  # the simulator writes its fleet file once its ports are bound
        gateway = subprocess.Popen(
            [sys.executable, "-m", "kvroute.cli", "serve"],
            stdout=gw_out,
            stderr=subprocess.STDOUT,
            env={
                **env,
                "KVROUTE_FLEET_FILE": str(fleet_file),
                "KVROUTE_HOST": "127.0.0.1",
                "KVROUTE_PORT": str(port),
                "KVROUTE_LOG_LEVEL": "warning",
                "KVROUTE_MAX_PROMPT_TOKENS": "4096",
            },
        )
        url = f"http://127.0.0.1:{port}"
        _wait(f"{url}/readyz", gateway, gw_log)
        yield url
    finally:
        for proc in (gateway, sim):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        sim_out.close()
        gw_out.close()


def test_the_served_document_is_the_one_in_the_package(gateway_url: str) -> None:
    from kvroute.gateway.openapi import openapi_document

    served = httpx.get(f"{gateway_url}/openapi.json", timeout=10).json()
    assert served == openapi_document()
    assert set(served["paths"]) >= {"/v1/completions", "/v1/chat/completions", "/v1/route"}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_endpoint_answers_generated_requests_as_documented(
    gateway_url: str, mode: GenerationMode
) -> None:
    schema = schemathesis.openapi.from_url(f"{gateway_url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance]
    if mode is GenerationMode.POSITIVE:
        checks.append(response_schema_conformance)
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to get wrong in a GET without parameters

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: object) -> None:
            response = case.call(base_url=gateway_url, timeout=30)  # type: ignore[attr-defined]
            if response.status_code in (502, 503):  # the engines', documented: not ours
                return
            case.validate_response(response, checks=checks)  # type: ignore[attr-defined]

        check()
