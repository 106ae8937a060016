"""Fleet and RemoteTokenizer against real simulated engines (kvroute.sim over uvicorn and ZMQ)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvroute.fleet import (
    NUM_REQUESTS_RUNNING,
    NUM_REQUESTS_WAITING,
    load_fleet_file,
)
from kvroute.sim import SimConfig, SimFleet
from kvroute.tokenize import CachingTokenizer, RemoteTokenizer
from kvroute.upstream import HttpxEngineClient
from tests.engine_clients import engine_client, quiet_fleet
from tests.polling import eventually

MODEL = "sim/llama"
DEADLINE_S = 10.0


@pytest.fixture
async def sim() -> AsyncIterator[SimFleet]:
    fleet = SimFleet(2, MODEL, dp_ranks=2, lora=["sql"], config=SimConfig(num_gpu_blocks=256))
    await fleet.start()
    try:
        yield fleet
    finally:
        await fleet.close()


@pytest.fixture
async def client() -> AsyncIterator[HttpxEngineClient]:
    async with engine_client() as c:
        yield c


async def test_simulator_fleet_file_loads_with_per_rank_sources(
    sim: SimFleet, tmp_path: Path
) -> None:
    path = tmp_path / "fleet.yaml"
    sim.write_fleet_file(path)
    specs = load_fleet_file(path)
    assert [s.name for s in specs] == [e.name for e in sim.engines]
    for spec, engine in zip(specs, sim.engines, strict=True):
        assert spec.url == engine.url and spec.lora == ("sql",)
        sources = spec.sources()
        assert [s.endpoint for s in sources] == list(engine.events_endpoints)
        assert [s.replay_endpoint for s in sources] == list(engine.replay_endpoints)
        assert [s.source for s in sources] == [f"{engine.name}/{r}" for r in engine.ranks]


async def test_health_scrape_and_kill(
    sim: SimFleet, tmp_path: Path, client: HttpxEngineClient
) -> None:
    path = tmp_path / "fleet.yaml"
    sim.write_fleet_file(path)
    fleet = quiet_fleet(load_fleet_file(path), client, unhealthy_after=1, probe_timeout_s=5.0)
    await fleet.check_health()
    assert all(e.healthy for e in fleet.engines())
    await fleet.scrape()
    for state in fleet.engines():
        assert state.scraped[NUM_REQUESTS_RUNNING] == 0.0
        assert state.scraped[NUM_REQUESTS_WAITING] == 0.0
    victim = sim.engines[0].name
    await sim.kill_engine(victim)
    await fleet.check_health()
    dead = fleet.get(victim)
    assert dead is not None and not dead.healthy
    assert dead.last_error is not None and "ConnectError" in dead.last_error
    assert fleet.url_for_model(MODEL) == sim.engines[1].url


async def test_remote_tokenizer_returns_the_engines_own_ids(
    sim: SimFleet, tmp_path: Path, client: HttpxEngineClient
) -> None:
    path = tmp_path / "fleet.yaml"
    sim.write_fleet_file(path)
    fleet = quiet_fleet(load_fleet_file(path), client)
    tok = CachingTokenizer(
        RemoteTokenizer(client, fleet.url_for_model, timeout_s=5.0), max_entries=16
    )
    prompt = "You are a helpful assistant. Summarise the following text."
    assert await tok.tokenize_prompt(MODEL, prompt) == sim.tokenizer.encode(prompt)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert await tok.tokenize_chat(MODEL, messages) == sim.tokenizer.encode_chat(messages)
    assert await tok.tokenize_chat(
        "sql", messages, add_generation_prompt=False
    ) == sim.tokenizer.encode_chat(messages, add_generation_prompt=False)


async def test_fleet_file_rewritten_by_the_simulator_is_picked_up(
    tmp_path: Path, client: HttpxEngineClient
) -> None:
    path = tmp_path / "fleet.yaml"
    async with SimFleet(1, MODEL, name_prefix="first-") as one:
        one.write_fleet_file(path)
        fleet = quiet_fleet(load_fleet_file(path), client, fleet_file=path)
        await fleet.start()
        try:
            async with SimFleet(1, MODEL, name_prefix="second-") as two:
                two.write_fleet_file(path)  # atomic replace: a new inode
                await eventually(
                    lambda: [e.name for e in fleet.engines()] == ["second-0"], "the new fleet"
                )
        finally:
            await fleet.close()
