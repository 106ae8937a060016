"""kvroute against two real vLLM engines: the index mirrors what each engine cached.

Tests run in file order and share one cluster (engines take ~30 s to start).
"""

from __future__ import annotations

import json
import signal
import urllib.request
from typing import Any

import pytest
from openai import OpenAI

from kvroute.fleet import KV_POOL_BLOCKS, scan_vllm_gauges
from tests.e2e.real_vllm.conftest import EARLY_PROMPT, Cluster
from tests.e2e.real_vllm.processes import VllmEngine, http_json, wait_until

BLOCK = 32  # the CPU build refuses 16
REPORT: dict[str, Any] = {}


def full_blocks(cluster: Cluster, prompt: str) -> int:
    return len(cluster.engines[0].tokenize(prompt)) // BLOCK


def wait_blocks(cluster: Cluster, prompt: str, want: dict[str, int], timeout_s: float = 30) -> None:
    seen: dict[str, int] = {}

    def holds() -> bool:
        nonlocal seen
        seen = cluster.router.blocks_by_engine(prompt)
        return all(seen.get(name, 0) == n for name, n in want.items())

    try:
        wait_until(holds, timeout_s, f"blocks {want}")
    except TimeoutError as exc:
        raise AssertionError(f"expected blocks {want}, index reports {seen}") from exc


def cached_directly(cluster: Cluster, engine: VllmEngine, prompt: str) -> int:
    """Serve `prompt` on `engine` (bypassing kvroute) and wait until the index holds it all."""
    n = full_blocks(cluster, prompt)
    engine.complete(prompt)
    wait_blocks(cluster, prompt, {engine.name: n})
    return n


def proxied(cluster: Cluster, prompt: str, max_tokens: int = 4) -> str:
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(
        f"{cluster.router.url}/v1/completions",
        data=body,
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        engine: str = resp.headers["x-kvroute-engine"]
        resp.read()
    return engine


def other(cluster: Cluster, name: str) -> str:
    return next(e.name for e in cluster.engines if e.name != name)


def test_late_start_recovers_earlier_events_by_replay(cluster: Cluster) -> None:
    n = full_blocks(cluster, EARLY_PROMPT)
    assert n >= 2
    early = cluster.early_engine
    wait_blocks(cluster, EARLY_PROMPT, {early: n, other(cluster, early): 0})
    assert cluster.router.metric("kvroute_replays_total", outcome="ok") >= 2
    REPORT["late_start"] = {"engine": early, "blocks": n}


@pytest.mark.parametrize("i", range(4))
def test_index_holds_exactly_the_served_prompt(cluster: Cluster, i: int) -> None:
    prompt = f"request number {i} asks about " + " ".join(
        f"topic{i}x{j} detail{j}" for j in range(30)
    )
    n = full_blocks(cluster, prompt)
    engine = proxied(cluster, prompt)
    wait_blocks(cluster, prompt, {engine: n, other(cluster, engine): 0})
    REPORT.setdefault("served", []).append({"engine": engine, "blocks": n})


SYSTEM = (
    "you are the archivist of a very old library. you answer questions about the catalogue, "
    "the reading rooms, the rules for borrowing rare manuscripts, the opening hours, and the "
    "history of the building. always answer briefly and precisely. "
)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_shared_prefix_lands_on_holder_through_openai_sdk(
    cluster: Cluster, api: str, stream: bool
) -> None:
    client = OpenAI(base_url=f"{cluster.router.url}/v1", api_key="unused", max_retries=0)
    prefix = f"[{api}-{stream}] " + SYSTEM * 2

    def ask(question: str) -> tuple[str, int]:
        usage_opts: dict[str, Any] = {"stream_options": {"include_usage": True}} if stream else {}
        if api == "completions":
            kwargs: dict[str, Any] = dict(
                model="tiny", prompt=prefix + question, max_tokens=4, stream=stream, **usage_opts
            )
            raw_c = client.completions.with_raw_response if not stream else None
            if raw_c is not None:
                raw = raw_c.create(**kwargs)
                usage = raw.parse().usage
                return raw.headers["x-kvroute-engine"], _cached(usage)
            with client.completions.with_streaming_response.create(**kwargs) as resp:
                chunks = list(resp.parse())
                return resp.headers["x-kvroute-engine"], _cached(chunks[-1].usage)
        messages = [
            {"role": "system", "content": prefix},
            {"role": "user", "content": question},
        ]
        kwargs = dict(model="tiny", messages=messages, max_tokens=4, stream=stream, **usage_opts)
        if not stream:
            raw = client.chat.completions.with_raw_response.create(**kwargs)
            return raw.headers["x-kvroute-engine"], _cached(raw.parse().usage)
        with client.chat.completions.with_streaming_response.create(**kwargs) as resp:
            chunks = list(resp.parse())
            return resp.headers["x-kvroute-engine"], _cached(chunks[-1].usage)

    first, _ = ask("where is the map room?")
    # Wait until the index holds the first request's prefix before sending the second.
    wait_until(
        lambda: cluster.router.metric("kvroute_events_applied_total", type="BlockStored") > 0,
        30,
        "events",
    )
    second, cached = ask("when does the map room open on sundays?")
    assert second == first
    assert cached >= BLOCK
    REPORT.setdefault("shared_prefix", []).append(
        {"api": api, "stream": stream, "engine": first, "cached_tokens": cached}
    )


def _cached(usage: Any) -> int:
    assert usage is not None, "usage missing"
    details = usage.prompt_tokens_details
    return int(details.cached_tokens or 0) if details is not None else 0


def test_eviction_stops_matching(cluster: Cluster) -> None:
    prompt = "eviction probe: " + " ".join(f"probe{j}" for j in range(60))
    n = full_blocks(cluster, prompt)
    engine_name = proxied(cluster, prompt)
    wait_blocks(cluster, prompt, {engine_name: n})
    removed_before = cluster.router.metric("kvroute_events_applied_total", type="BlockRemoved")
    engine = cluster.engine(engine_name)
    # 24 blocks of 32 tokens: a handful of distinct ~300-token prompts overflows the pool.
    for i in range(6):
        engine.complete(engine.prompt_of_tokens(f"flood{i}x", 300))
    wait_until(
        lambda: cluster.router.blocks_by_engine(prompt).get(engine_name, 0) < n,
        30,
        "the evicted prefix to stop matching",
    )
    removed = cluster.router.metric("kvroute_events_applied_total", type="BlockRemoved")
    assert removed > removed_before
    REPORT["eviction"] = {"engine": engine_name, "block_removed_applied": removed}


def test_pool_size_is_scraped_and_free_kv_tokens_reach_the_cost(cluster: Cluster) -> None:
    # vLLM labels its info gauge vllm:cache_config_info with num_gpu_blocks (24 here: the
    # fixture's --num-gpu-blocks-override); kv_aware's eviction term reads it from the scrape.
    engine = cluster.engines[0]
    with urllib.request.urlopen(f"{engine.url}/metrics", timeout=10) as resp:
        pool = scan_vllm_gauges(resp.read().decode()).get(KV_POOL_BLOCKS)
    assert pool == 24.0, f"vllm:cache_config_info num_gpu_blocks: expected 24, got {pool}"
    free: dict[str, Any] = {}

    def reported() -> bool:
        nonlocal free
        free = {
            e["name"]: e["free_kv_tokens"] for e in cluster.router.route("free probe")["engines"]
        }
        return all(v is not None for v in free.values())

    try:
        wait_until(reported, 30, "free_kv_tokens for every engine")
    except TimeoutError as exc:
        raise AssertionError(f"free_kv_tokens: {free}") from exc
    for name, tokens in free.items():
        assert 0 <= tokens <= 24 * BLOCK and tokens % BLOCK == 0, (name, tokens)
    REPORT["free_kv_tokens"] = free


def test_reset_prefix_cache_empties_engine_in_index(cluster: Cluster) -> None:
    engine = cluster.engines[0]
    prompt = "reset probe: " + " ".join(f"resetword{j}" for j in range(50))
    cached_directly(cluster, engine, prompt)
    urllib.request.urlopen(
        urllib.request.Request(f"{engine.url}/reset_prefix_cache", method="POST"), timeout=30
    ).read()
    engine.complete("flush")  # AllBlocksCleared rides on the next scheduler step's batch
    wait_blocks(cluster, prompt, {engine.name: 0})
    cleared = cluster.router.metric("kvroute_events_applied_total", type="AllBlocksCleared")
    assert cleared >= 1
    REPORT["reset"] = {"engine": engine.name, "all_blocks_cleared_applied": cleared}


def test_engine_restart_resets_its_source_and_it_comes_back(cluster: Cluster) -> None:
    engine = cluster.engines[1]
    prompt = "restart probe: " + " ".join(f"restartword{j}" for j in range(50))
    n = cached_directly(cluster, engine, prompt)
    resets_before = cluster.router.metric("kvroute_source_resets_total", source=f"{engine.name}/0")

    engine.stop(signal.SIGKILL)
    engine.start()
    engine.wait_ready()
    # The new process starts at seq 0 with an empty cache and sends no AllBlocksCleared.
    wait_blocks(cluster, prompt, {engine.name: 0}, timeout_s=60)
    resets = cluster.router.metric("kvroute_source_resets_total", source=f"{engine.name}/0")
    assert resets > resets_before

    engine.complete(prompt)
    wait_blocks(cluster, prompt, {engine.name: n}, timeout_s=60)
    wait_until(
        lambda: any(
            e["name"] == engine.name and e["healthy"]
            for e in cluster.router.route(prompt)["engines"]
        ),
        30,
        "restarted engine healthy",
    )
    assert proxied(cluster, prompt) == engine.name
    REPORT["restart"] = {"engine": engine.name, "resets": resets, "blocks_after": n}


def test_zz_report(cluster: Cluster) -> None:
    """Not a check: prints what the run observed, for the closing note."""
    counts = {
        t: cluster.router.metric("kvroute_events_applied_total", type=t)
        for t in ("BlockStored", "BlockRemoved", "AllBlocksCleared")
    }
    REPORT["events_applied"] = counts
    REPORT["requests"] = http_json(f"{cluster.router.url}/debug/engines")
    print("\nREAL-VLLM REPORT " + json.dumps(REPORT, default=str))
    assert counts["BlockStored"] > 0
