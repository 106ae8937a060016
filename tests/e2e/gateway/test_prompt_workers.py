"""Large request bodies parsed, checked and tokenized by prompt worker processes
(gateway/prompt_worker.py): the same answers as on the loop, and a dead worker replaced."""

from __future__ import annotations

import contextlib
import json
from array import array
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvroute.errors import GatewayHTTPError
from kvroute.gateway import BackgroundServer, create_app
from kvroute.gateway.openai_body import RequestKind, RoutingRequest, parse_request
from kvroute.gateway.prompt_worker import PromptLimits, PromptWorkers
from kvroute.metrics import Metrics
from kvroute.settings import load_settings
from kvroute.sim import SimConfig, SimFleet
from kvroute.tokenize import LocalTokenizer
from tests.polling import eventually
from tests.unit.tokenize.test_local import TEMPLATE, _train

LIMITS = PromptLimits(max_body_bytes=1 << 20, max_json_depth=16, max_prompt_tokens=1000)
MODEL = "sim-model"

BODIES: list[tuple[RequestKind | None, bytes]] = [
    (RequestKind.COMPLETION, json.dumps({"model": "m", "prompt": "hello world " * 50}).encode()),
    (RequestKind.COMPLETION, json.dumps({"model": "m", "prompt": list(range(900))}).encode()),
    (RequestKind.COMPLETION, json.dumps({"model": "m", "prompt": list(range(1001))}).encode()),
    (RequestKind.COMPLETION, b'{"model": "m", "prompt": "x", "max_tokens": NaN}'),
    (RequestKind.COMPLETION, b'{"model": "m", "prompt": "\\ud800"}'),
    (RequestKind.CHAT, b"{oops"),
    (RequestKind.CHAT, b"[" * 100),
    (
        RequestKind.CHAT,
        json.dumps(
            {
                "model": "m",
                "messages": [{"role": "user", "content": "hello world"}] * 3,
                "max_completion_tokens": 5,
                "chat_template_kwargs": {"enable_thinking": True},
            }
        ).encode(),
    ),
    (None, json.dumps({"model": "m", "messages": [{"role": "user", "content": "a"}]}).encode()),
    (None, json.dumps({"model": "m", "prompt": "the messages"}).encode()),
]


def _inline(kind: RequestKind | None, raw: bytes) -> object:
    """What the loop answers for `raw`: the parsed request, or the error's fields."""
    try:
        return parse_request(
            kind, raw, LIMITS.max_body_bytes, LIMITS.max_json_depth, LIMITS.max_prompt_tokens
        )
    except GatewayHTTPError as exc:
        return (exc.status, exc.message, exc.param, exc.code)


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[PromptWorkers]:
    pool = PromptWorkers(1, LIMITS, tokenizer_json=_train(tmp_path), chat_template=TEMPLATE)
    try:
        yield pool
    finally:
        await pool.close()


async def test_a_worker_answers_as_the_loop_does(workers: PromptWorkers) -> None:
    for kind, raw in BODIES:
        expected = _inline(kind, raw)
        try:
            prepared = await workers.prepare(kind, raw)
        except GatewayHTTPError as exc:
            assert (exc.status, exc.message, exc.param, exc.code) == expected, raw[:80]
            continue
        assert isinstance(expected, RoutingRequest)
        if isinstance(expected.prompt, list):  # ids come back packed, once, not in the request
            assert isinstance(prepared.token_ids, array) and prepared.token_ids.typecode == "I"
            assert list(prepared.token_ids) == expected.prompt
            expected = replace(expected, prompt=None)
        assert prepared.request == expected, raw[:80]
    assert workers.jobs == len(BODIES) and workers.restarts == 0


async def test_a_worker_tokenizes_as_the_gateways_tokenizer(
    workers: PromptWorkers, tmp_path: Path
) -> None:
    local = LocalTokenizer(tmp_path / "tokenizer.json", TEMPLATE)
    for kind, raw in BODIES:
        try:
            prepared = await workers.prepare(kind, raw)
        except GatewayHTTPError:
            continue
        req = prepared.request
        if req.kind is RequestKind.COMPLETION:
            prompt = req.prompt if req.prompt is not None else list(prepared.token_ids or ())
            expected = await local.tokenize_prompt(req.model, prompt)
        else:
            assert req.messages is not None
            expected = await local.tokenize_chat(
                req.model,
                req.messages,
                add_generation_prompt=req.add_generation_prompt,
                chat_template_kwargs=req.chat_template_kwargs,
            )
        assert prepared.token_ids is not None and prepared.tokenize_error is None, raw[:80]
        assert list(prepared.token_ids) == expected, raw[:80]


async def test_a_tokenized_prompt_over_the_limit_is_refused_in_the_worker(
    workers: PromptWorkers,
) -> None:
    raw = json.dumps({"model": "m", "prompt": "hello " * 1500}).encode()
    with pytest.raises(GatewayHTTPError) as info:
        await workers.prepare(RequestKind.COMPLETION, raw)
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"
    assert "at most 1000 tokens, got 1501" in info.value.message  # 1,500 words and <s>


async def test_a_dead_worker_costs_one_503_and_is_replaced(workers: PromptWorkers) -> None:
    kind, raw = BODIES[0]
    await workers.prepare(kind, raw)
    (idle,) = workers._idle
    idle.proc.kill()
    await idle.proc.wait()
    with pytest.raises(GatewayHTTPError) as info:
        await workers.prepare(kind, raw)
    assert info.value.status == 503
    assert workers.restarts == 1
    assert (await workers.prepare(kind, raw)).request == _inline(kind, raw)  # a text prompt


@contextlib.asynccontextmanager
async def _gateway(
    tmp_path: Path, **settings: Any
) -> AsyncIterator[tuple[SimFleet, httpx.AsyncClient, Metrics]]:
    """One simulated engine and a gateway offloading bodies from 1 KiB on, with `settings`."""
    async with SimFleet(1, MODEL, config=SimConfig(speed=50.0)) as fleet:
        fleet.write_fleet_file(tmp_path / "fleet.yaml")
        options = load_settings(
            fleet_file=tmp_path / "fleet.yaml",
            port=0,
            log_level="warning",
            prompt_offload_bytes=1024,
            **settings,
        )
        metrics = Metrics()
        async with (
            BackgroundServer(create_app(options, metrics=metrics)) as server,
            httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=60) as http,
        ):
            yield fleet, http, metrics


async def test_a_gateway_routes_large_bodies_through_a_worker(tmp_path: Path) -> None:
    async with _gateway(tmp_path, max_prompt_tokens=5000) as (fleet, http, metrics):
        prompt = fleet.tokenizer.make_text(2000, "large")
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
        assert len(json.dumps(body)) > 1024
        first = await http.post("/v1/completions", json=body)
        assert first.status_code == 200, first.text
        routes = 0  # each /v1/route of the large body is offloaded too
        seen: Any = None

        async def matched() -> bool:
            # The engine's BlockStored events reach the index a moment after its answer (under
            # load, after the 2 s speculative entry is gone): poll, do not assume.
            nonlocal routes, seen
            decision = await http.post("/v1/route", json=body)
            routes += 1
            assert decision.status_code == 200, decision.text
            seen = decision.json()["engines"]
            return bool(seen[0]["blocks_matched"] > 0)  # tokenized and matched

        try:
            await eventually(matched, "the prompt's blocks indexed")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the last /v1/route said {seen}") from exc
        ids = {"model": MODEL, "prompt": [1] * 10_000, "max_tokens": 1}
        refused = await http.post("/v1/completions", json=ids)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "context_length_exceeded"
        small = await http.post(
            "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}
        )
        assert small.status_code == 200, small.text
        # the large completion, each /v1/route of it, the refused ids
        assert metrics.prompts_offloaded._value.get() == 2 + routes


@pytest.mark.parametrize("policy", ["kv_aware", "round_robin"])
async def test_workers_tokenize_only_for_a_policy_that_reads_tokens(
    tmp_path: Path, policy: str
) -> None:
    tokenizer = _train(tmp_path)
    async with _gateway(tmp_path, policy=policy, tokenizer_path=tokenizer) as (_, http, metrics):
        prompt = "hello world " * 200  # 400 words: 401 tokens with BOS, 2,400 characters
        decision = await http.post("/v1/route", json={"model": MODEL, "prompt": prompt})
        assert decision.status_code == 200, decision.text
        assert metrics.prompts_offloaded._value.get() == 1
        tokens = decision.json()["prompt_tokens"]
        assert tokens == (401 if policy == "kv_aware" else len(prompt) // 4)
