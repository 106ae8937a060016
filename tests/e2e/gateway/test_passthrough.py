"""The engines' other JSON endpoints through the gateway (issue 15: they were 404s): tokenize,
detokenize, embeddings, responses and the rest reach a healthy engine of the body's model, by
prefix when the body has a prompt, by load otherwise. Real simulated engines behind a real
gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from kvroute.gateway import ENGINE_HEADER
from kvroute.gateway.openai_body import PASSTHROUGH_PATHS
from kvroute.sim import SimFleet
from tests.polling import eventually
from tests.sim_gateway import MODEL, sim_gateway


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, SimFleet]]:
    async with sim_gateway(
        tmp_path, 3, num_gpu_blocks=1024, log_level="warning", prompt_offload_bytes=4096
    ) as gateway:
        yield gateway.http, gateway.fleet


async def test_tokenize_goes_to_the_engine_holding_its_prompt_and_answers_as_the_engine(
    stack: tuple[httpx.AsyncClient, SimFleet],
) -> None:
    http, fleet = stack
    prompt = fleet.tokenizer.make_text(512, seed="passthrough")
    done = await http.post(
        "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1}
    )
    assert done.status_code == 200, done.text
    holder = done.headers[ENGINE_HEADER]

    async def held() -> bool:
        route = await http.post("/v1/route", json={"model": MODEL, "prompt": prompt})
        best = max(route.json()["engines"], key=lambda e: e["tokens_matched"])
        return bool(best["name"] == holder and best["tokens_matched"] >= 256)

    await eventually(held, "the completion's blocks are in the index")
    for _ in range(4):  # not luck: every time
        tokenized = await http.post("/tokenize", json={"model": MODEL, "prompt": prompt})
        assert tokenized.status_code == 200, tokenized.text
        assert tokenized.headers[ENGINE_HEADER] == holder
    ids = tokenized.json()["tokens"]
    assert ids == fleet.tokenizer.encode(prompt)
    back = await http.post("/detokenize", json={"model": MODEL, "tokens": ids[:5]})
    assert back.status_code == 200, back.text
    assert back.headers[ENGINE_HEADER]  # no prompt: by load, to some engine
    assert back.json()["prompt"] == fleet.tokenizer.decode(ids[:5])
    chat = await http.post(
        "/tokenize", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert chat.status_code == 200 and chat.json()["count"] > 0


async def test_every_passed_through_path_reaches_an_engine(
    stack: tuple[httpx.AsyncClient, SimFleet],
) -> None:
    http, _ = stack
    for path in PASSTHROUGH_PATHS:
        response = await http.post(path, json={"model": MODEL, "input": "some text"})
        # The simulator serves tokenize and detokenize only; an engine's own 404 or 400 for
        # the others still says the request reached it (the gateway's answers have no engine).
        assert response.headers.get(ENGINE_HEADER), (path, response.status_code, response.text)
        assert response.headers["x-request-id"]


async def test_refusals_before_an_engine_is_chosen(
    stack: tuple[httpx.AsyncClient, SimFleet],
) -> None:
    http, _ = stack
    missing = await http.post("/v1/embeddings", json={"input": "x"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
    unknown = await http.post("/v1/embeddings", json={"model": "nope", "input": "x"})
    assert unknown.status_code == 404 and ENGINE_HEADER not in unknown.headers
    garbage = await http.post(
        "/tokenize", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert garbage.status_code == 400
    not_object = await http.post("/tokenize", json=[1, 2, 3])
    assert not_object.status_code == 400


async def test_a_large_body_is_routed_by_load_after_reading_only_its_model(
    stack: tuple[httpx.AsyncClient, SimFleet],
) -> None:
    http, fleet = stack
    prompt = fleet.tokenizer.make_text(4000, seed="large")  # over prompt_offload_bytes (4096)
    tokenized = await http.post("/tokenize", json={"prompt": prompt, "model": MODEL})
    assert tokenized.status_code == 200, tokenized.text
    assert tokenized.json()["count"] == len(fleet.tokenizer.encode(prompt))
