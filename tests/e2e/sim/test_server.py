"""The simulator's HTTP API over real uvicorn servers: OpenAI SDK, vLLM extras, time model."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import yaml
from openai import AsyncOpenAI, NotFoundError

from kvroute.sim import SimConfig, SimFleet
from tests.polling import eventually

MODEL = "sim/test-model"


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    f = SimFleet(2, MODEL, config=SimConfig(speed=50.0), lora=["sql-adapter"])
    await f.start()
    try:
        yield f
    finally:
        await f.close()


@pytest.fixture
async def client(fleet: SimFleet) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fleet.engines[0].url, timeout=10) as c:
        yield c


async def test_cached_prefix_is_faster_by_exactly_the_modelled_prefill_time(
    fleet: SimFleet,
) -> None:
    warm, cold = fleet.engines
    prompt = fleet.tokenizer.make_text(300, seed="ttft")
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4}
    async with httpx.AsyncClient(timeout=10) as c:
        first = await c.post(warm.url + "/v1/completions", json=body)
        again = await c.post(warm.url + "/v1/completions", json=body)
        cold_r = await c.post(cold.url + "/v1/completions", json=body)
    assert first.status_code == again.status_code == cold_r.status_code == 200
    cached = again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == 288  # 301 tokens (BOS + 300): 18 full blocks of 16
    assert cold_r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cfg = fleet.config
    saved_ms = cached / cfg.prefill_tok_per_s * 1000
    ttft_cold = float(cold_r.headers["x-sim-ttft-ms"])
    ttft_warm = float(again.headers["x-sim-ttft-ms"])
    assert ttft_cold == pytest.approx(301 / cfg.prefill_tok_per_s * 1000 + cfg.decode_step_s * 1000)
    assert ttft_cold - ttft_warm == pytest.approx(saved_ms, abs=1e-5)
    e2e = float(cold_r.headers["x-sim-e2e-ms"])
    assert e2e == pytest.approx(ttft_cold + 3 * cfg.decode_step_s * 1000, abs=1e-5)


async def test_openai_sdk_completions_and_chat_streaming_and_not(fleet: SimFleet) -> None:
    async with AsyncOpenAI(base_url=fleet.engines[0].url + "/v1", api_key="x") as oa:
        c = await oa.completions.create(model=MODEL, prompt="Say hello", max_tokens=5)
        assert c.choices[0].finish_reason == "length" and len(c.choices[0].text.split()) == 5
        assert c.usage is not None and c.usage.completion_tokens == 5
        assert c.usage.prompt_tokens == 3

        text = ""
        usage = None
        stream = await oa.completions.create(
            model=MODEL, prompt="Say hello", max_tokens=5, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage is not None:
                usage = chunk.usage
        assert text == c.choices[0].text
        assert usage is not None and usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens == 0  # 3 tokens: no full block

        messages = [{"role": "user", "content": "hello there"}]
        chat = await oa.chat.completions.create(model=MODEL, messages=messages, max_tokens=7)  # type: ignore[arg-type]
        content = chat.choices[0].message.content
        assert chat.choices[0].message.role == "assistant" and content is not None
        parts = []
        s2 = await oa.chat.completions.create(
            model="sql-adapter", messages=messages, max_completion_tokens=7, stream=True,  # type: ignore[arg-type]
        )  # fmt: skip
        async for chunk in s2:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason
        assert "".join(parts) == content and finish == "length"

        models = await oa.models.list()
        cards = {m.id: m for m in models.data}
        assert set(cards) == {MODEL, "sql-adapter"}
        extra = cards["sql-adapter"].model_extra or {}
        assert extra["parent"] == MODEL and (cards[MODEL].model_extra or {})["parent"] is None

        with pytest.raises(NotFoundError):
            await oa.completions.create(model="nope", prompt="x", max_tokens=1)


async def test_streaming_headers_carry_ttft_and_last_chunk_carries_e2e(
    client: httpx.AsyncClient,
) -> None:
    body = {"model": MODEL, "prompt": [1, 5, 6, 7], "max_tokens": 3, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert float(r.headers["x-sim-ttft-ms"]) == pytest.approx(4 / 16 + 12)
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: ") :])
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["sim"]["e2e_ms"] == pytest.approx(4 / 16 + 12 + 2 * 12)


async def test_tokenize_and_detokenize_in_vllm_shapes(client: httpx.AsyncClient) -> None:
    r = await client.post("/tokenize", json={"model": MODEL, "prompt": "Hello, world"})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["count"] == 4 and body["token_strs"] is None and body["tokens"][0] == 1
    r = await client.post(
        "/tokenize", json={"prompt": "Hello, world", "add_special_tokens": False,
                           "return_token_strs": True},
    )  # fmt: skip
    assert r.json()["token_strs"] == ["Hello", ",", "world"]
    messages = [{"role": "user", "content": "hi"}]
    chat = (await client.post("/tokenize", json={"model": MODEL, "messages": messages})).json()
    # the chat form yields exactly the prompt a chat completion uses
    done = await client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 1}
    )
    assert done.json()["usage"]["prompt_tokens"] == chat["count"]
    r = await client.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert r.json() == {"prompt": "Hello , world"}


async def test_render_returns_vllm_generate_requests_without_generating(
    fleet: SimFleet, client: httpx.AsyncClient
) -> None:
    tokenized = await client.post("/tokenize", json={"model": MODEL, "prompt": "Hello, world"})
    ids = tokenized.json()["tokens"]
    r = await client.post(
        "/v1/completions/render",
        json={"model": MODEL, "prompt": "Hello, world", "max_tokens": 7, "temperature": 0.5},
    )
    assert r.status_code == 200
    (one,) = r.json()  # a list: one GenerateRequest per prompt of the batch
    assert one["request_id"].startswith("cmpl-") and one["model"] == MODEL
    assert one["token_ids"] == ids
    assert one["sampling_params"] == {"temperature": 0.5, "max_tokens": 7}
    assert one["token_offsets"] is None and one["features"] is None and one["stream"] is False
    batch = await client.post(
        "/v1/completions/render", json={"model": MODEL, "prompt": ["Hello, world", [5, 6, 7]]}
    )
    assert [g["token_ids"] for g in batch.json()] == [ids, [5, 6, 7]]
    messages = [{"role": "user", "content": "hi"}]
    chat = await client.post(
        "/v1/chat/completions/render",
        json={"model": MODEL, "messages": messages, "stream": True,
              "stream_options": {"include_usage": True}},
    )  # fmt: skip
    body = chat.json()  # one GenerateRequest, stream fields kept
    assert body["request_id"].startswith("chatcmpl-")
    tokenized_chat = await client.post("/tokenize", json={"model": MODEL, "messages": messages})
    assert body["token_ids"] == tokenized_chat.json()["tokens"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    for e in fleet.engines:  # nothing ran
        assert all(r.scheduler.prompt_tokens_total == 0 for r in e.all_ranks())
    missing = await client.post("/v1/completions/render", json={"model": "x", "prompt": "a"})
    assert missing.status_code == 404 and "error" in missing.json()


async def test_responses_name_the_engine_that_served_them(fleet: SimFleet) -> None:
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 1}
    async with httpx.AsyncClient(timeout=10) as c:
        for e in fleet.engines:
            r = await c.post(e.url + "/v1/completions", json=body)
            assert r.json()["sim"]["engine"] == e.name


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/completions", b"{not json", 400),
        ("/v1/completions", b"[1, 2]", 400),
        ("/v1/completions", b'{"model": "sim/test-model"}', 400),
        ("/v1/completions", b'{"model": "sim/test-model", "prompt": [1, -2]}', 400),
        ("/v1/completions", b'{"model": "sim/test-model", "prompt": "x", "max_tokens": 0}', 400),
        ("/v1/completions", b'{"model": "sim/test-model", "prompt": "x", "stream": "yes"}', 400),
        ("/v1/completions", b'{"model": "other", "prompt": "x"}', 404),
        ("/v1/chat/completions", b'{"model": "sim/test-model", "messages": []}', 400),
        ("/v1/chat/completions", b'{"model": "sim/test-model", "messages": [{"x": 1}]}', 400),
        ("/tokenize", b'{"model": "sim/test-model"}', 400),
        ("/detokenize", b'{"tokens": ["a"]}', 400),
        ("/sim/faults", b'{"explode": true}', 400),
        ("/sim/faults", b'{"drop_next": -1}', 400),
    ],
)
async def test_bad_requests_get_openai_error_json(
    client: httpx.AsyncClient, path: str, body: bytes, status: int
) -> None:
    r = await client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["code"] == status


async def test_too_long_prompt_is_rejected(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": [5] * 40_000, "max_tokens": 1}
    )
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]


async def test_metrics_use_vllm_names(client: httpx.AsyncClient) -> None:
    prompt = [1, *range(200, 240)]
    for _ in range(2):
        r = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2}
        )
        assert r.status_code == 200
    text = (await client.get("/metrics")).text
    for name in (
        "vllm:num_requests_running{",
        "vllm:num_requests_waiting{",
        "vllm:kv_cache_usage_perc{",
        "vllm:time_to_first_token_seconds_bucket{",
    ):
        assert name in text
    assert f'vllm:prefix_cache_queries_total{{engine="0",model_name="{MODEL}"}} 82.0' in text
    assert f'vllm:prefix_cache_hits_total{{engine="0",model_name="{MODEL}"}} 32.0' in text
    assert "vllm:time_to_first_token_seconds_count" in text


async def test_health_reset_and_state(fleet: SimFleet, client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).status_code == 200
    await client.post("/v1/completions", json={"model": MODEL, "prompt": [1] * 40, "max_tokens": 1})
    state = (await client.get("/sim/state")).json()
    assert state["engine"] == fleet.engines[0].name
    [rank] = state["ranks"]
    assert rank["rank"] == 0 and rank["seq"] == 0 and len(rank["cached"]) == 2
    first, second = rank["cached"]
    assert first["parent"] is None and second["parent"] == first["hash"]
    assert first["medium"] == "GPU" and first["lora_name"] is None
    assert (await client.post("/reset_prefix_cache")).status_code == 200
    assert (await client.get("/sim/state")).json()["ranks"][0]["cached"] == []


def test_fleet_yaml_is_empty_before_start() -> None:
    fleet = SimFleet(1, MODEL, dp_ranks=2, lora=["a"])
    assert fleet.fleet_yaml() == "engines: []\n"


async def test_fleet_file_lists_real_consecutive_rank_ports_and_kill_stops_http(
    tmp_path: Path,
) -> None:
    async with SimFleet(2, MODEL, dp_ranks=2, lora=["a"]) as fleet:
        path = tmp_path / "fleet.yaml"
        fleet.write_fleet_file(path)
        data = yaml.safe_load(path.read_text())
        assert [e["name"] for e in data["engines"]] == ["engine-0", "engine-1"]
        for entry, engine in zip(data["engines"], fleet.engines, strict=True):
            assert entry["url"] == engine.url and entry["dp_ranks"] == [0, 1]
            port = int(entry["events"].rsplit(":", 1)[1])
            assert engine.events_endpoints == [
                f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"
            ]  # fmt: skip
            replay = int(entry["replay"].rsplit(":", 1)[1])
            assert engine.replay_endpoints[1] == f"tcp://127.0.0.1:{replay + 1}"
            assert entry["topic"] == "kv" and entry["lora"] == ["a"] and entry["model"] == MODEL
        async with httpx.AsyncClient() as c:
            assert (await c.get(fleet.engines[1].url + "/health")).status_code == 200
        await fleet.kill_engine("engine-1")
        async with httpx.AsyncClient() as c:
            with pytest.raises(httpx.ConnectError):
                await c.get(fleet.engines[1].url + "/health")


async def test_wall_time_follows_simulated_time_over_speed() -> None:
    fleet = SimFleet(1, MODEL, config=SimConfig(speed=2.0))
    async with fleet, httpx.AsyncClient(timeout=10) as c:
        c.base_url = httpx.URL(fleet.engines[0].url)
        loop = asyncio.get_running_loop()
        t = loop.time()
        r = await c.post(
            "/v1/completions", json={"model": MODEL, "prompt": [1] * 8, "max_tokens": 10}
        )
        wall = loop.time() - t
    sim_s = float(r.headers["x-sim-e2e-ms"]) / 1000
    assert sim_s == pytest.approx(8 / 16_000 + 10 * 0.012)
    assert wall >= sim_s / 2.0 * 0.95


async def _wait_idle(client: httpx.AsyncClient) -> dict[str, object]:
    rank: dict[str, object] = {}

    async def idle() -> bool:
        rank.update((await client.get("/sim/state")).json()["ranks"][0])
        return rank["running"] == 0 and rank["waiting"] == 0

    await eventually(idle, "rank 0 idle")
    return rank


async def test_client_disconnect_aborts_the_request_and_frees_blocks() -> None:
    fleet = SimFleet(1, MODEL, config=SimConfig(speed=1.0))
    async with fleet, httpx.AsyncClient(timeout=10) as c:
        c.base_url = httpx.URL(fleet.engines[0].url)
        body = {"model": MODEL, "prompt": [1] * 40, "max_tokens": 5000, "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break  # first token seen: hang up
        rank = await _wait_idle(c)
        assert rank["used_blocks"] == 0


async def test_restart_fails_in_flight_requests_and_empties_the_pool() -> None:
    fleet = SimFleet(1, MODEL, config=SimConfig(speed=1.0))
    async with fleet, httpx.AsyncClient(timeout=10) as c:
        c.base_url = httpx.URL(fleet.engines[0].url)
        body = {"model": MODEL, "prompt": [1] * 40, "max_tokens": 5000}
        pending = asyncio.create_task(c.post("/v1/completions", json=body))

        async def running() -> bool:
            return bool((await c.get("/sim/state")).json()["ranks"][0]["running"])

        await eventually(running, "the request running")
        assert (await c.post("/sim/faults", json={"restart": True})).status_code == 200
        r = await pending
        assert r.status_code == 500 and "restarted" in r.json()["error"]["message"]
        state = (await c.get("/sim/state")).json()["ranks"][0]
        assert state["cached"] == [] and state["seq"] is None and state["used_blocks"] == 0
        ok = await c.post("/v1/completions", json={**body, "max_tokens": 1})
        assert ok.status_code == 200


async def test_dp_ranks_share_load_and_the_rank_header_pins_a_rank() -> None:
    fleet = SimFleet(1, MODEL, dp_ranks=2, config=SimConfig(speed=1.0))
    async with fleet, httpx.AsyncClient(timeout=10) as c:
        c.base_url = httpx.URL(fleet.engines[0].url)
        body = {"model": MODEL, "prompt": [1] * 20, "max_tokens": 20}
        both = await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(2)))
        assert sorted(r.headers["x-sim-rank"] for r in both) == ["0", "1"]
        pinned = await c.post("/v1/completions", json=body, headers={"X-data-parallel-rank": "1"})
        assert pinned.headers["x-sim-rank"] == "1"
        # rank 1 already computed this prompt: a prefix hit there
        assert pinned.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 16
        bad = await c.post("/v1/completions", json=body, headers={"X-data-parallel-rank": "5"})
        assert bad.status_code == 400


async def test_metrics_count_a_request_running_until_its_last_token_is_due() -> None:
    # The step loop computes a step ahead of the wall clock: the scheduler is past a request
    # its current step finishes, but its client waits until that step's end, and vLLM's
    # num_requests_running (which routers scrape as load) still counts it meanwhile.
    fleet = SimFleet(1, MODEL, config=SimConfig(speed=0.002))  # one step: ~6 s of wall time
    async with fleet, httpx.AsyncClient(timeout=30) as c:
        c.base_url = httpx.URL(fleet.engines[0].url)
        rank = fleet.engines[0].all_ranks()[0]
        body = {"model": MODEL, "prompt": [1] * 40, "max_tokens": 1}
        pending = asyncio.create_task(c.post("/v1/completions", json=body))
        try:
            await eventually(
                lambda: rank.scheduler.num_running == 0 and rank.finishing == 1,
                "the one-step request finished by the scheduler, its step still under way",
            )
            text = (await c.get("/metrics")).text
            assert f'vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 1.0' in text
            assert not pending.done()
        finally:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
