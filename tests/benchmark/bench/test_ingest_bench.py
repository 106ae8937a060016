"""bench/ingest_bench.py at smoke size: a real publisher process, a sane structure (not speed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kvroute.bench.ingest_bench import run


def test_ingest_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = run(size="smoke", out_dir=tmp_path)
    assert (data["size"], data["events_per_message"], data["block_size"]) == ("smoke", 10, 16)
    messages = data["messages"]
    for key in ("pipeline", "subscriber_decode_no_index", "baseline_decode_apply_in_process"):
        row = data[key]
        assert row["messages"] == messages
        assert row["events_per_s"] == pytest.approx(row["messages_per_s"] * 10, rel=0.01)
        assert row["blocks_per_s"] > row["events_per_s"]  # 4-block stores, 10% 1-block removals
    pipeline = data["pipeline"]
    assert pipeline["seq_gaps"] == 0
    assert pipeline["blocks_indexed"] > 0
    assert pipeline["publisher_messages_per_s"] > 0
    assert data["subscriber_decode_no_index"]["blocks_indexed"] == 0
    baseline = data["baseline_raw_zmq"]
    assert baseline["messages"] == messages and baseline["received"] == messages
    assert baseline["events_per_s"] > 0
    for latency in (data["latency"], data["latency_no_index"]):
        assert latency["rate_events_per_s"] == 50_000 and latency["samples"] > 100
        assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]
        assert all(math.isfinite(latency[k]) for k in ("p50_ms", "p99_ms", "max_ms"))
    saved = json.loads((tmp_path / "ingest.json").read_text())
    assert saved["name"] == "ingest" and saved["pipeline"] == pipeline
    out = capsys.readouterr().out
    assert "ingest" in out and "raw pyzmq" in out


def test_ingest_bench_rejects_unknown_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        run(size="huge", out_dir=tmp_path)
