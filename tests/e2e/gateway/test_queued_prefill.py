"""kv_aware's queued prefill through a real gateway and simulated engines: a prompt in flight
counts in its engine's cost until it ends, and a second request goes where it waits least."""

from __future__ import annotations

from pathlib import Path

from kvroute.gateway import ENGINE_HEADER
from tests.polling import eventually
from tests.sim_gateway import MODEL, sim_gateway


async def test_a_prompt_in_flight_is_queued_prefill_at_its_engine_until_it_ends(
    tmp_path: Path,
) -> None:
    # 0.01 token/s: next to nothing drains, so only the request's end empties the queue;
    # w_load 0 leaves the queue alone to move the second request.
    async with sim_gateway(
        tmp_path,
        2,
        num_gpu_blocks=2048,
        log_level="warning",
        prefill_tok_per_s=0.01,
        w_load=0.0,
    ) as gw:
        first = gw.fleet.tokenizer.make_text(600, seed="queued-first")
        other = gw.fleet.tokenizer.make_text(600, seed="queued-other")
        # 20,000 tokens decode for 12 s at the simulator's ×20: in flight throughout the checks
        # on a loaded host; leaving the block disconnects, which ends it.
        body = {"model": MODEL, "prompt": first, "max_tokens": 20_000, "stream": True}
        async with gw.http.stream("POST", "/v1/completions", json=body) as stream:
            assert stream.status_code == 200
            busy = stream.headers[ENGINE_HEADER]
            chunks = stream.aiter_bytes()
            await anext(chunks)  # the engine is generating: the request is in flight
            route = await gw.http.post("/v1/route", json={"model": MODEL, "prompt": other})
            data = route.json()
            queued = {e["name"]: e["queued_prefill_tokens"] for e in data["engines"]}
            costs = {e["name"]: e["cost"] for e in data["engines"]}
            idle = next(name for name in queued if name != busy)
            assert queued[idle] == 0.0
            assert queued[busy] >= 590  # the first prompt, none of it cached before it went
            assert abs(costs[busy] - costs[idle] - queued[busy]) < 0.1  # rounded to 0.1
            assert data["engine"] == idle and data["policy"] == "kv_aware"

        async def drained() -> bool:
            route = await gw.http.post("/v1/route", json={"model": MODEL, "prompt": other})
            return all(e["queued_prefill_tokens"] == 0.0 for e in route.json()["engines"])

        await eventually(drained, "the ended request no longer counts as queued prefill")
