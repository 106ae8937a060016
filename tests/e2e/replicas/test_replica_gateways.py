"""Several gateway replicas in front of one simulated fleet: each sees the load the others send
(engine reports, the shared store), shares speculative entries through a real redis-server, and
answers every request while that store is killed and restarted."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvroute.gateway import ENGINE_HEADER, BackgroundServer, create_app
from kvroute.metrics import Metrics
from kvroute.settings import load_settings
from kvroute.sim import SimConfig, SimFleet
from tests.polling import eventually
from tests.redis_server import RedisServer, redis_server

MODEL = "sim-model"
DEADLINE_S = 15.0


class _Replicas:
    """`n` gateways (uvicorn, port 0) over one fleet file, each with its own HTTP client."""

    def __init__(self, fleet: SimFleet, clients: list[httpx.AsyncClient]) -> None:
        self.fleet = fleet
        self.http = clients

    async def debug(self, i: int) -> dict[str, Any]:
        data: dict[str, Any] = (await self.http[i].get("/debug/engines")).json()
        return data

    async def load(self, i: int, engine: str) -> dict[str, Any]:
        engines = {e["name"]: e for e in (await self.debug(i))["engines"]}
        load: dict[str, Any] = engines[engine]["load"]
        return load


@contextlib.asynccontextmanager
async def _replicas(
    tmp_path: Path, settings: list[dict[str, Any]], *, speed: float = 20.0
) -> AsyncIterator[_Replicas]:
    async with AsyncExitStack() as stack:
        fleet = await stack.enter_async_context(
            SimFleet(2, MODEL, config=SimConfig(num_gpu_blocks=1024, speed=speed))
        )
        path = tmp_path / "fleet.yaml"
        fleet.write_fleet_file(path)
        clients = []
        for extra in settings:
            options: dict[str, Any] = {
                "fleet_file": path,
                "port": 0,
                "health_interval_s": 0.2,
                "scrape_interval_s": 0.05,
                "watch_interval_s": 0.2,
                "shared_state_interval_s": 0.05,
                "shared_state_ttl_s": 1.0,
                "retry_backoff_min_s": 0.05,
                "retry_backoff_max_s": 0.2,
                "log_level": "warning",
                **extra,
            }
            app = create_app(load_settings(**options), metrics=Metrics())
            server = await stack.enter_async_context(BackgroundServer(app))
            # Idle connections expire on our side well before uvicorn's 5 s keep-alive, so no
            # request goes out on a connection the server is closing (an ECONNRESET race).
            limits = httpx.Limits(keepalive_expiry=1.0)
            http = httpx.AsyncClient(
                base_url=server.url, timeout=30.0, trust_env=False, limits=limits
            )
            clients.append(await stack.enter_async_context(http))
        yield _Replicas(fleet, clients)


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with redis_server(tmp_path) as server:
        yield server


async def test_a_replica_sees_what_another_sent_through_the_engines_report(
    tmp_path: Path,
) -> None:
    # No shared store: replica 1 (load_source blended) learns replica 0's request from the
    # engine's own gauges, replica 2 (local, the default) does not.
    settings = [{}, {"load_source": "blended"}, {}]
    async with _replicas(tmp_path, settings, speed=1.0) as r:
        prompt = r.fleet.tokenizer.make_text(64, seed="long")
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 400}  # ~5 s at speed 1
        sent = asyncio.create_task(r.http[0].post("/v1/completions", json=body))
        busy: list[str] = []

        async def seen_by_replica_1() -> bool:
            for engine in (e.name for e in r.fleet.engines):
                if (await r.load(1, engine))["requests"] == 1:
                    busy[:] = [engine]
                    return True
            return False

        await eventually(seen_by_replica_1, "replica 1 counts replica 0's request")
        (engine,) = busy
        mine = {e["name"]: e for e in (await r.debug(1))["engines"]}[engine]
        assert mine["in_flight_requests"] == 0  # it is not replica 1's own
        assert (await r.load(0, engine))["requests"] == 1  # the sender counts it once
        assert (await r.load(2, engine))["requests"] == 0  # local only: blind to it
        assert not sent.done(), "the request ended before the check: too fast a machine?"
        assert (await sent).status_code == 200
        await eventually(lambda: _all_zero(r, engine), "the request leaves every view")


async def _all_zero(r: _Replicas, engine: str) -> bool:
    return all([(await r.load(i, engine))["requests"] == 0 for i in range(3)])


async def test_speculative_entries_are_shared_before_any_event_confirms_them(
    tmp_path: Path, redis: RedisServer
) -> None:
    settings = [{"shared_state_url": redis.url}] * 2
    async with _replicas(tmp_path, settings) as r:
        await eventually(lambda: _shared_ready(r, 2), "both replicas on the store")
        async with httpx.AsyncClient(trust_env=False, timeout=10) as c:
            for engine in r.fleet.engines:  # no event leaves the engines from now on
                await c.post(f"{engine.url}/sim/faults", json={"pause": True})
        prompt = r.fleet.tokenizer.make_text(600, seed="shared-prefix")
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
        response = await r.http[0].post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        chosen = response.headers[ENGINE_HEADER]

        async def replica_1_holds_it() -> bool:
            decision = (await r.http[1].post("/v1/route", json=body)).json()
            scores = {s["name"]: s for s in decision["engines"]}
            return bool(scores[chosen]["speculative_blocks"] > 0 and decision["engine"] == chosen)

        await eventually(replica_1_holds_it, "replica 1 routes the prefix to replica 0's engine")
        other = next(e.name for e in r.fleet.engines if e.name != chosen)
        decision = (await r.http[1].post("/v1/route", json=body)).json()
        assert {s["name"]: s for s in decision["engines"]}[other]["speculative_blocks"] == 0
        assert {s["name"]: s for s in decision["engines"]}[chosen]["blocks_matched"] == 0


async def _shared_ready(r: _Replicas, n: int) -> bool:
    states = [(await r.debug(i))["shared_state"] for i in range(n)]
    return all(s["up"] and s["peers"] == n - 1 for s in states)


async def _shared_down(r: _Replicas, n: int) -> bool:
    return not any([(await r.debug(i))["shared_state"]["up"] for i in range(n)])


async def test_store_killed_mid_run_and_restarted_returns_no_error_to_clients(
    tmp_path: Path, redis: RedisServer
) -> None:
    settings = [{"shared_state_url": redis.url}] * 2
    async with _replicas(tmp_path, settings) as r:
        await eventually(lambda: _shared_ready(r, 2), "both replicas on the store")
        statuses: list[int] = []
        stop = asyncio.Event()
        counter = itertools.count()

        async def client(worker: int) -> None:
            while not stop.is_set():
                i = next(counter)
                prompt = r.fleet.tokenizer.make_text(200, seed=f"group-{i % 5}")
                body = {"model": MODEL, "prompt": prompt + f" q{i}", "max_tokens": 4}
                response = await r.http[i % 2].post("/v1/completions", json=body)
                statuses.append(response.status_code)

        workers = [asyncio.create_task(client(w)) for w in range(4)]
        try:
            await eventually(lambda: len(statuses) >= 20, "traffic before the outage")
            await redis.kill()
            await eventually(lambda: _shared_down(r, 2), "both replicas see the store down")
            during = len(statuses)
            await eventually(lambda: len(statuses) >= during + 20, "traffic during the outage")
            await redis.start()
            await eventually(lambda: _shared_ready(r, 2), "both replicas back on the store")
            after = len(statuses)
            await eventually(lambda: len(statuses) >= after + 20, "traffic after the restart")
        finally:
            stop.set()
            await asyncio.gather(*workers)
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
        for http in r.http:
            text = (await http.get("/metrics")).text
            assert 'kvroute_shared_state_errors_total{op="sync"}' in text
            assert "kvroute_shared_state_up 1.0" in text
