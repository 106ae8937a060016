"""The index benchmarks run at smoke size and report their documented structure (not speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvroute.bench import index_bench
from kvroute.core import source_id


def test_smoke_run_prints_tables_and_writes_json(tmp_path: Path) -> None:
    data = index_bench.run("smoke", tmp_path)
    assert set(data) == {"apply", "memory", "match", "stalls"}
    for name in ("index_apply", "index_memory", "index_match"):
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert record["size"] == "smoke"
        assert {r["index"] for r in record["results"]} == set(index_bench.factories())
    stalls = json.loads((tmp_path / "index_stalls.json").read_text())
    assert {r["index"] for r in stalls["results"]} == set(index_bench.factories()) - {
        index_bench.NAIVE
    }
    assert all(r["clear_ms"] >= 0 and r["reset_ms"] >= 0 for r in stalls["results"])
    assert all(r["inserts_per_s"] > 0 for r in data["apply"]["results"])
    if index_bench.NATIVE in index_bench.factories():  # the live path's rows beside the lists'
        assert {
            (r["token_ids"], r["events_per_batch"])
            for r in data["apply"]["results"]
            if r["index"] == index_bench.NATIVE
        } == {(t, n) for t in ("int list", "msgpack bytes (live ingest)") for n in (1, 32)}
    # RSS moves in pages: a small fill may fit pages the interpreter had already.
    assert all(r["bytes_per_block_source"] >= 0 for r in data["memory"]["results"])
    assert all(0 < r["p50_us"] <= r["p99_us"] for r in data["match"]["results"])
    assert {(r["engines"], r["prompt_tokens"]) for r in data["match"]["results"]} == {
        (4, 1024),
        (4, 8192),
        (16, 1024),
        (16, 8192),
    }


def test_naive_baseline_agrees_with_each_index_on_a_small_fill() -> None:
    naive = index_bench.NaiveIndex()
    index_bench._fill_for_match(naive, 4, 2_000, [256], 2)
    for name, factory in index_bench.factories().items():
        if name == index_bench.NAIVE:
            continue
        ours = factory()
        prompts = index_bench._fill_for_match(ours, 4, 2_000, [256], 2)
        for tokens in prompts[256]:
            got = {e: r.blocks for e, r in ours.match(index_bench.MODEL, None, tokens).items()}
            assert got == naive.match(index_bench.MODEL, tokens, 16), name


def test_the_live_path_applies_the_same_stores_as_the_int_lists() -> None:
    factory = index_bench.factories().get(index_bench.NATIVE)
    if factory is None:
        pytest.skip("the native index is not built")
    lists, raw = factory(), factory()
    payloads = index_bench._aibrix_payloads(300, 32)
    index_bench._time_apply(lists, payloads)
    index_bench._time_apply(raw, payloads, raw=True)
    src = source_id("engine-0", 0)
    assert lists.source_block_count(src) == raw.source_block_count(src) == 300
    for i in (0, 7, 299, 300):
        tokens = [i, *range(1, 100)]
        got = [
            {e: r.blocks for e, r in x.match(index_bench.MODEL, None, tokens).items()}
            for x in (lists, raw)
        ]
        assert got[0] == got[1] == ({"engine-0": 1} if i < 300 else {})
