"""`kvroute bench trace` end to end on tiny synthetic traces: the JSON report's schema, the
chart, kv_aware's hit rate against round robin's, the oracle, and the capacity search."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvroute.bench.trace import TraceOptions, run_trace_async
from kvroute.core import PolicyName

PNG = b"\x89PNG\r\n\x1a\n"


def conversations(path: Path, users: int, turns: int, gap_ms: int) -> Path:
    """`users` multi-turn chats, turn-major, one request every `gap_ms`: turn t of a user sends
    its group's 2-block system prompt (two groups), then 2 blocks per earlier turn and its new
    question (its growing history)."""
    lines = []
    for t in range(turns):
        for u in range(users):
            system = [1000 * (u % 2), 1000 * (u % 2) + 1]
            hash_ids = system + [10_000 + 100 * u + k for k in range(2 * t + 1)]
            row = {
                "timestamp": len(lines) * gap_ms,
                "input_length": len(hash_ids) * 512 - 100,
                "output_length": 64,
                "hash_ids": hash_ids,
            }
            lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_replay_writes_the_report_and_kv_aware_hits_at_least_as_often(
    tmp_path: Path,
) -> None:
    trace = conversations(tmp_path / "chats.jsonl", users=6, turns=5, gap_ms=500)
    options = TraceOptions(
        trace=trace,
        policies=(PolicyName.KV_AWARE, PolicyName.ROUND_ROBIN),
        speed=10.0,
        capacity=False,
        out_dir=tmp_path / "out",
    )
    assert await run_trace_async(options) == 0
    report = json.loads((tmp_path / "out" / "trace.json").read_text())
    assert report["trace"] == str(trace)
    assert report["slo_ms"] == options.slo_ms
    assert list(report["policies"]) == ["kv_aware", "round_robin"]
    for row in report["policies"].values():
        assert set(row) >= {"hit_rate", "ttft_ms", "capacity_rps_at_slo", "requests", "errors"}
        assert set(row["ttft_ms"]) == {"p50", "p90", "p99"}
        assert row["ttft_ms"]["p50"] <= row["ttft_ms"]["p90"] <= row["ttft_ms"]["p99"]
        assert row["requests"] == 30 and row["errors"] == 0
        assert row["capacity_rps_at_slo"] is None  # not measured
        assert 0.0 <= row["hit_rate"] <= 1.0
    kv, rr = report["policies"]["kv_aware"], report["policies"]["round_robin"]
    assert kv["hit_rate"] > 0.3
    assert kv["hit_rate"] >= rr["hit_rate"]
    assert report["setup"]["requests"] == 30
    # Prefills chunked as vLLM V1 does, the step budget scaled like the prompts.
    setup = report["setup"]
    assert setup["max_num_batched_tokens"] == options.max_num_batched_tokens
    assert setup["sim_max_num_batched_tokens"] == max(
        16, round(options.max_num_batched_tokens * setup["token_scale"])
    )
    assert (tmp_path / "out" / "trace.png").read_bytes()[:8] == PNG


async def _kv_aware_capacity(
    tmp_path: Path, turns: int, *, capacity_steps: int, capacity_repeats: int = 1
) -> dict[str, Any]:
    """The report of kv_aware's capacity search on 3 users × `turns` small chat requests, whose
    SLO any run meets."""
    trace = conversations(tmp_path / "chats.jsonl", users=3, turns=turns, gap_ms=1000)
    options = TraceOptions(
        trace=trace,
        policies=(PolicyName.KV_AWARE,),
        speed=10.0,
        slo_ms=600_000.0,  # met by any run of these few small requests
        out_dir=tmp_path,
        chart=False,
        capacity_steps=capacity_steps,
        capacity_repeats=capacity_repeats,
    )
    assert await run_trace_async(options) == 0
    report: dict[str, Any] = json.loads((tmp_path / "trace.json").read_text())
    return report


async def test_capacity_search_reports_a_rate(tmp_path: Path) -> None:
    report = await _kv_aware_capacity(tmp_path, 3, capacity_steps=2)
    row = report["policies"]["kv_aware"]
    trials = row["capacity"]["trials"]
    assert [t["time_factor"] for t in trials] == [1.0, 0.5, 0.25]
    assert all(t["passed"] for t in trials)
    assert row["capacity"]["bracketed"] is False  # every run passed: a lower bound
    # the trace's 1 req/s, 4× as fast, as the requests really went out (a busy host sends late)
    assert 0.0 < row["capacity_rps_at_slo"] <= 4.2
    assert not (tmp_path / "trace.png").exists()


async def test_a_repeated_capacity_search_runs_each_step_that_often(tmp_path: Path) -> None:
    report = await _kv_aware_capacity(tmp_path, 2, capacity_steps=1, capacity_repeats=2)
    assert report["setup"]["capacity_repeats"] == 2
    assert report["setup"]["capacity_jitter"] == 0.002
    trials = report["policies"]["kv_aware"]["capacity"]["trials"]
    assert [t["time_factor"] for t in trials] == [1.0, 0.5]
    for t in trials:  # the main run and one more at the start; two at the step
        assert len(t["ttft_p90_ms_runs"]) == 2
        assert t["ttft_p90_ms"] == max(t["ttft_p90_ms_runs"])  # of two, the worse decides
        # the repeat ran just off the step's factor (TraceOptions.capacity_jitter)
        assert t["time_factor_runs"] == [t["time_factor"], round(t["time_factor"] * 1.002, 5)]
        assert t["passed"]


async def test_the_oracle_runs_through_the_same_gateway_path(tmp_path: Path) -> None:
    trace = conversations(tmp_path / "chats.jsonl", users=6, turns=4, gap_ms=500)
    options = TraceOptions(
        trace=trace,
        policies=("oracle",),
        speed=10.0,
        capacity=False,
        out_dir=tmp_path,
        chart=False,
    )
    assert await run_trace_async(options) == 0
    row = json.loads((tmp_path / "trace.json").read_text())["policies"]["oracle"]
    assert row["requests"] == 24 and row["errors"] == 0
    assert row["hit_rate"] > 0.3  # it routes by the pools: each chat's history is found
    # served through the gateway: its engine header names the engines
    assert sum(row["requests_per_engine"].values()) == 24
    assert set(row["added_latency_wall_ms"]) == {"p50", "p90", "p99"}
