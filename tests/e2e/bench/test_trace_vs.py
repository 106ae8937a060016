"""`kvroute bench trace --vs vllm-router` end to end when `make bench-peers` installed it: both
of its policies replay a tiny trace on the simulated fleet, and kv_aware finds the prefixes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvroute.bench.trace import TraceOptions, run_trace_async
from kvroute.bench.vllm_router import PeerMissing, find_vllm_router
from tests.e2e.bench.test_trace import conversations

try:
    find_vllm_router()
except PeerMissing:
    pytest.skip(
        "vllm-router is not installed in .venv-peers (`make bench-peers` installs it)",
        allow_module_level=True,
    )


async def test_vllm_router_replays_the_trace_on_kvroutes_fleet(tmp_path: Path) -> None:
    trace = conversations(tmp_path / "chats.jsonl", users=6, turns=5, gap_ms=500)
    options = TraceOptions(
        trace=trace,
        policies=("round_robin",),
        vs=("kv_aware", "cache_aware"),
        speed=10.0,
        capacity=False,
        out_dir=tmp_path,
        chart=False,
    )
    assert await run_trace_async(options) == 0
    report = json.loads((tmp_path / "trace.json").read_text())["policies"]
    assert list(report) == ["round_robin", "vllm-router:kv_aware", "vllm-router:cache_aware"]
    for name in ("vllm-router:kv_aware", "vllm-router:cache_aware"):
        row = report[name]
        assert row["requests"] == 30 and row["errors"] == 0, row["error_samples"]
        # TTFT as for kvroute: the simulator's header, relayed by the router
        assert row["ttft_ms"]["p50"] is not None
        # the engine of each answer, from the simulator's own field (vllm-router names none)
        assert sum(row["requests_per_engine"].values()) == 30
        assert row["added_latency_wall_ms"]["p50"] is not None
    # vllm-router's kv_aware consumed the engines' KV events (topic "", token ids): it found
    # the chats' histories, well above round robin's spread over four engines
    assert report["vllm-router:kv_aware"]["hit_rate"] > 0.3
    assert report["vllm-router:kv_aware"]["hit_rate"] > report["round_robin"]["hit_rate"]
