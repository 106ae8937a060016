"""The gateway tokenizes only for a policy that reads tokens: /tokenize calls counted at the
simulated engines (real HTTP servers), and what stands in for the token count otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvroute.core import PolicyName
from tests.sim_gateway import MODEL, SimGateway, sim_gateway


async def _tokenize_calls(gw: SimGateway) -> int:
    """POST /tokenize calls the engines answered, as each reports on /sim/state."""
    total = 0
    for engine in gw.fleet.engines:
        state = (await gw.http.get(f"{engine.url}/sim/state")).json()
        total += int(state["tokenize_requests"])
    return total


def _metric(text: str, line_start: str) -> float:
    """The sum of the series whose line starts with `line_start` (over every engine label)."""
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)
    )


@pytest.mark.parametrize(
    "policy", [PolicyName.ROUND_ROBIN, PolicyName.LEAST_LOADED, PolicyName.RANDOM]
)
async def test_a_load_only_policy_never_calls_tokenize(tmp_path: Path, policy: PolicyName) -> None:
    async with sim_gateway(tmp_path, policy=policy) as gw:
        text = gw.fleet.tokenizer.make_text(200, "load-only")
        completion = await gw.http.post(
            "/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 2}
        )
        chat = await gw.http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 2},
        )
        embeddings = await gw.http.post("/v1/route", json={"model": MODEL, "prompt": text})
        assert (completion.status_code, chat.status_code) == (200, 200), completion.text
        assert embeddings.json()["prompt_tokens"] == len(text) // 4  # the estimate
        assert await _tokenize_calls(gw) == 0
        metrics = (await gw.http.get("/metrics")).text
        assert _metric(metrics, 'kvroute_tokenizer_cache_lookups_total{result="miss"}') == 0
        assert _metric(metrics, "kvroute_prompt_tokens_total") == 2 * (len(text) // 4)


async def test_kv_aware_tokenizes_once_per_distinct_prompt_and_caches_the_rest(
    tmp_path: Path,
) -> None:
    async with sim_gateway(tmp_path, policy=PolicyName.KV_AWARE) as gw:
        texts = [gw.fleet.tokenizer.make_text(64, f"kv-{i}") for i in range(2)]
        for text in [*texts, texts[0]]:
            reply = await gw.http.post(
                "/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 2}
            )
            assert reply.status_code == 200, reply.text
        routed = (await gw.http.post("/v1/route", json={"model": MODEL, "prompt": texts[1]})).json()
        assert routed["prompt_tokens"] == 65  # exact: 64 words and BOS
        assert await _tokenize_calls(gw) == 2  # one round trip per distinct prompt
        metrics = (await gw.http.get("/metrics")).text
        assert _metric(metrics, 'kvroute_tokenizer_cache_lookups_total{result="miss"}') == 2
        assert _metric(metrics, 'kvroute_tokenizer_cache_lookups_total{result="hit"}') == 2
        assert _metric(metrics, "kvroute_tokenizer_cache_entries") == 2


async def test_without_tokens_max_prompt_tokens_holds_the_estimate_and_ids_count_exactly(
    tmp_path: Path,
) -> None:
    async with sim_gateway(tmp_path, policy=PolicyName.ROUND_ROBIN, max_prompt_tokens=100) as gw:
        long_text = gw.fleet.tokenizer.make_text(120, "long")  # ~7 characters a word
        refused = await gw.http.post(
            "/v1/completions", json={"model": MODEL, "prompt": long_text, "max_tokens": 2}
        )
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "context_length_exceeded"
        routed = await gw.http.post("/v1/route", json={"model": MODEL, "prompt": [7] * 90})
        assert routed.json()["prompt_tokens"] == 90  # ids given: their count, not an estimate
        assert await _tokenize_calls(gw) == 0
