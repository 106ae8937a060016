"""bench/ingest_bench.py at smoke size: a real publisher process, a sane structure (not speed)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from kvroute.bench.ingest_bench import latency_impls, run, run_latency
from kvroute.index.impl import native_error, resolve_impl


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
    _check_latency(data)
    saved = json.loads((tmp_path / "ingest.json").read_text())
    assert saved["name"] == "ingest" and saved["pipeline"] == pipeline
    assert saved["latency_by_impl"] == data["latency_by_impl"]
    out = capsys.readouterr().out
    assert "ingest" in out and "raw pyzmq" in out
    assert "ingest latency" in out and "native index" in out and "python index" in out


def _check_latency(data: dict[str, Any]) -> None:
    """The latency rows: the no-index baseline and one per implementation, prefilled."""
    impls = ["native", "python"] if native_error() is None else ["python"]
    assert latency_impls() == impls
    by_impl = data["latency_by_impl"]
    assert list(by_impl) == impls
    assert data["latency"] == by_impl[resolve_impl("auto")]  # the default, under its old key
    prefill = data["latency_prefill_blocks"]
    assert prefill == 20_000 and data["targets"]["latency_blocks_held"] == 1_000_000
    rows = [("none", data["latency_no_index"]), *by_impl.items()]
    for impl, latency in rows:
        assert latency["impl"] == impl
        assert latency["rate_events_per_s"] == 50_000 and latency["samples"] > 100
        assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]
        assert all(math.isfinite(latency[k]) for k in ("p50_ms", "p99_ms", "max_ms"))
        # Each message at its own send time; the old measure took its slice's oldest.
        assert latency["p99_ms"] <= latency["p99_slice_worst_ms"]
        assert latency["events"] >= latency["samples"] * 10
        assert latency["loop_cpu_seconds"] > 0 and latency["loop_cpu_us_per_event"] > 0
        if impl == "none":
            assert latency["blocks_held_at_start"] == latency["blocks_held_at_end"] == 0
        else:  # the prefill is held before the run, and more after it
            assert latency["blocks_held_at_start"] == prefill
            assert latency["blocks_held_at_end"] > prefill


def test_ingest_latency_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = run_latency(size="smoke", out_dir=tmp_path)
    _check_latency(data)
    saved = json.loads((tmp_path / "ingest-latency.json").read_text())
    assert saved["name"] == "ingest-latency" and saved["latency"] == data["latency"]
    assert "target: p99 < 1 ms" in capsys.readouterr().out


def test_ingest_bench_rejects_unknown_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        run(size="huge", out_dir=tmp_path)
    with pytest.raises(ValueError, match="size"):
        run_latency(size="huge", out_dir=tmp_path)
