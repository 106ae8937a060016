"""kv_aware's eviction term through a real gateway and simulated engines: the pool size each
engine reports (`vllm:cache_config_info`) less what the index holds there is `free_kv_tokens`,
and a prompt no engine holds goes where prefilling it evicts nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from kvroute.gateway import ENGINE_HEADER
from tests.polling import eventually
from tests.sim_gateway import MODEL, SimGateway, sim_gateway

BLOCKS = 64  # per engine: 1,024 tokens of 16-token blocks
BLOCK_TOKENS = 16


async def _route(gw: SimGateway, prompt: str) -> dict[str, Any]:
    route = await gw.http.post("/v1/route", json={"model": MODEL, "prompt": prompt})
    assert route.status_code == 200, route.text
    data: dict[str, Any] = route.json()
    return data


async def test_free_kv_tokens_is_the_reported_pool_less_the_indexed_blocks(
    tmp_path: Path,
) -> None:
    async with sim_gateway(tmp_path, 2, num_gpu_blocks=BLOCKS, log_level="warning") as gw:
        probe = gw.fleet.tokenizer.make_text(40, seed="free-probe")

        async def reported() -> bool:
            data = await _route(gw, probe)
            return all(e["free_kv_tokens"] is not None for e in data["engines"])

        # No block is indexed yet, so the model's block size is unknown: null until one is.
        first = gw.fleet.tokenizer.make_text(400, seed="free-first")
        body = {"model": MODEL, "prompt": first, "max_tokens": 1}
        sent = await gw.http.post("/v1/completions", json=body)
        assert sent.status_code == 200, sent.text
        busy = sent.headers[ENGINE_HEADER]
        await eventually(reported, "both engines report their pool size")
        pool = BLOCKS * BLOCK_TOKENS

        async def accounted() -> bool:
            data = await _route(gw, probe)
            free = {e["name"]: e["free_kv_tokens"] for e in data["engines"]}
            held = {e.name: len(e.state()["ranks"][0]["cached"]) for e in gw.fleet.engines}
            return (
                all(free[n] == (BLOCKS - held[n]) * BLOCK_TOKENS for n in free)
                and free[busy] < pool
            )

        await eventually(accounted, "free_kv_tokens = (pool − indexed blocks) × block size")


async def test_an_engine_whose_pool_evicts_is_reported_evicting(tmp_path: Path) -> None:
    async with sim_gateway(tmp_path, 2, num_gpu_blocks=BLOCKS, log_level="warning") as gw:
        full = gw.fleet.engines[0].name
        probe = gw.fleet.tokenizer.make_text(40, seed="evicting-probe")
        # 64 blocks: the second 900-token prompt (56 blocks) evicts some of the first.
        async with httpx.AsyncClient(base_url=gw.fleet.engines[0].url, timeout=30.0) as engine:
            for i in range(3):
                prompt = gw.fleet.tokenizer.make_text(900, seed=f"evict-{i}")
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
                sent = await engine.post("/v1/completions", json=body)
                assert sent.status_code == 200, sent.text
                if i == 0:  # the first count of an engine is a baseline: take it before evicting

                    async def indexed() -> bool:
                        data = await _route(gw, probe)
                        return any(e["free_kv_tokens"] for e in data["engines"])

                    await eventually(indexed, "the first prompt's blocks indexed")
        seen: dict[str, bool] = {}
        weight: object = None

        async def evicting() -> bool:
            nonlocal seen, weight
            data = await _route(gw, probe)
            seen = {e["name"]: e["evicting"] for e in data["engines"]}
            weight = data["queue_weight"]
            return seen.get(full) is True

        await eventually(evicting, f"{full} reported evicting")
        assert seen == {full: True, gw.fleet.engines[1].name: False}
        # one engine of two evicting: w_queue 1 moves halfway to w_queue_evicting 0.1
        assert weight == pytest.approx(0.55)


async def test_a_new_prompt_goes_where_prefilling_it_evicts_nothing(tmp_path: Path) -> None:
    # w_load 0 and a queue that drains at once leave the eviction term alone to decide.
    async with sim_gateway(
        tmp_path,
        2,
        num_gpu_blocks=BLOCKS,
        log_level="warning",
        w_load=0.0,
        w_queue=0.0,
        prefill_tok_per_s=1e9,
    ) as gw:
        # Fill one engine's pool: prompts of 900 tokens (56 blocks) each, pinned there.
        full = gw.fleet.engines[0].name
        async with httpx.AsyncClient(base_url=gw.fleet.engines[0].url, timeout=30.0) as engine:
            for i in range(3):  # straight to the engine, past the gateway
                prompt = gw.fleet.tokenizer.make_text(900, seed=f"fill-{i}")
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
                sent = await engine.post("/v1/completions", json=body)
                assert sent.status_code == 200, sent.text
        fresh = gw.fleet.tokenizer.make_text(500, seed="fresh")

        async def full_and_empty() -> bool:
            data = await _route(gw, fresh)
            free = {e["name"]: e["free_kv_tokens"] for e in data["engines"]}
            return (
                free.get(full) is not None
                and free[full] < 100
                and all(
                    v is not None and v == BLOCKS * BLOCK_TOKENS
                    for n, v in free.items()
                    if n != full
                )
            )

        await eventually(full_and_empty, "one engine's pool full, the other's empty")
        data = await _route(gw, fresh)
        costs = {e["name"]: e["cost"] for e in data["engines"]}
        other = next(n for n in costs if n != full)
        assert data["engine"] == other, data
        # The full engine pays the whole prompt twice over: prefill plus what it evicts.
        assert costs[full] - costs[other] >= 400, costs
