"""tests/benchmark/sim_event_rate.py at a tiny size: counts add up (not speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmark import sim_event_rate

pytestmark = pytest.mark.skipif(
    not sim_event_rate.TRACE_FILE.exists(), reason="the Mooncake trace is not in ../shared/traces"
)


def test_sim_event_rate_tiny(tmp_path: Path) -> None:
    out = tmp_path / "rate.json"
    argv = ["--seconds", "4", "--warmup", "2", "--prefill", "2000", "--json", str(out)]
    assert sim_event_rate.main(argv) == 0
    data = json.loads(out.read_text())
    per_s = data["per_s"]
    assert per_s["messages"] > 0 and per_s["blocks_stored"] > 0
    assert per_s["events"] == pytest.approx(per_s["stored_events"] + per_s["removed_events"])
    assert per_s["tokens"] == pytest.approx(per_s["blocks_stored"] * 16)
    assert data["router"]["cpu_seconds_per_engine_second"] > 0


def test_hash_block_tokens_differ() -> None:
    a, b = sim_event_rate.hash_block_tokens(1), sim_event_rate.hash_block_tokens(32_001)
    assert len(a) == sim_event_rate.TRACE_BLOCK and a != b
    blocks = {tuple(a[i : i + 16]) for i in range(0, len(a), 16)}
    assert len(blocks) == len(a) // 16
