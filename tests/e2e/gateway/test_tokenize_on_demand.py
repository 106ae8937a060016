"""The gateway tokenizes only for a policy that reads tokens: /tokenize calls counted at the
simulated engines (real HTTP servers), and what stands in for the token count otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvroute.bench.sim_tokenizer_files import write_sim_tokenizer
from kvroute.core import PolicyName
from kvroute.sim.tokenizer import SimTokenizer
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


@pytest.mark.parametrize("piece_cache_bytes", [64 << 20, 0])
async def test_a_local_tokenizer_encodes_shared_prefixes_from_pieces_exactly(
    tmp_path: Path, piece_cache_bytes: int
) -> None:
    """The bench's tokenizer.json (the simulator's ids): completions and chats sharing a long
    system prompt get the engines' own ids (exact counts, prefix matches), no /tokenize call,
    and with the piece cache on the shared prompt's pieces are looked up, not encoded again."""
    sim = SimTokenizer()
    tokenizer_json, template = write_sim_tokenizer(sim, tmp_path / "tokenizer")
    async with sim_gateway(
        tmp_path,
        policy=PolicyName.KV_AWARE,
        tokenizer_path=tokenizer_json,
        chat_template_path=template,
        tokenizer_piece_cache_bytes=piece_cache_bytes,
    ) as gw:
        system = sim.make_text(600, "system")
        for i in range(3):
            own = sim.make_text(100, f"own-{i}")
            messages = [{"role": "system", "content": system}, {"role": "user", "content": own}]
            for path, body, ids in (
                ("/v1/completions", {"prompt": f"{system} {own}"}, sim.encode(f"{system} {own}")),
                ("/v1/chat/completions", {"messages": messages}, sim.encode_chat(messages)),
            ):
                reply = await gw.http.post(path, json={"model": MODEL, "max_tokens": 2, **body})
                assert reply.status_code == 200, reply.text
                routed = (await gw.http.post("/v1/route", json={"model": MODEL, **body})).json()
                assert routed["prompt_tokens"] == len(ids)
                # Routed, the engine already holds the request's prefix: matched from the ids.
                held = max(e["blocks_matched"] + e["speculative_blocks"] for e in routed["engines"])
                assert held >= len(ids) // 16 - 1
        assert await _tokenize_calls(gw) == 0
        metrics = (await gw.http.get("/metrics")).text
        hits = _metric(metrics, 'kvroute_tokenizer_piece_lookups_total{result="hit"}')
        if piece_cache_bytes:
            # Each later request found the system prompt's pieces (600 words, ~4 KB: 7 pieces).
            assert hits >= 2 * 2 * 6
            assert 0 < _metric(metrics, "kvroute_tokenizer_piece_cache_bytes") <= piece_cache_bytes
        else:
            assert "kvroute_tokenizer_piece_lookups_total" not in metrics
