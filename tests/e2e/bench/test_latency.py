"""`kvroute bench latency` at smoke size: the JSON's shape and what it counts, not its timings."""

from __future__ import annotations

import json
from pathlib import Path

from kvroute.cli import main


def test_smoke_run_reports_every_target_and_counts_tokenize_calls(tmp_path: Path) -> None:
    code = main(
        [
            "bench",
            "latency",
            "--size",
            "smoke",
            "--latency-rate",
            "32",
            "--latency-policies",
            "kv_aware,round_robin",
            "--latency-prompt-tokens",
            "256",
            "--vs",
            "vllm-router",
            "--peers-venv",
            str(tmp_path / "no-venv"),
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "latency.json").read_text())
    rows = {(r["target"], r["policy"], r["tokenizer"]): r for r in report["rows"]}
    assert list(rows) == [
        ("engine (direct)", None, None),
        ("kvroute", "kv_aware", "local"),
        ("kvroute", "kv_aware", "remote"),
        ("kvroute", "round_robin", "local"),
        ("kvroute", "round_robin", "remote"),
    ]
    for row in rows.values():
        assert row["requests"] == 24 and row["errors"] == {}
        assert row["added_ms"]["p50"] > 0 and row["engine_e2e_ms"]["p50"] > 0
        assert row["added_ms"]["p50"] <= row["added_ms"]["p90"] <= row["added_ms"]["p99"]
        assert isinstance(row["overhead_p50_ms"], float)
        cpu = row["router_cpu_ms_per_request"]
        assert cpu is None if row["target"] == "engine (direct)" else cpu > 0
    # Only kv_aware with the engines' /tokenize calls them: once per (distinct) request.
    calls = {key: row["router_tokenize_calls"] for key, row in rows.items()}
    assert calls.pop(("kvroute", "kv_aware", "remote")) == 24
    assert set(calls.values()) == {0}
    local = rows["kvroute", "kv_aware", "local"]
    assert local["gateway"]['tokenize_seconds_count{mode="local"}'] == 24 + 8  # and warm-up
    assert local["router_tokenize_mean_ms"] > 0
    assert rows["kvroute", "round_robin", "local"]["router_tokenize_mean_ms"] is None
    assert report["tokenize_rtt_ms"]["p50"] > 0
    assert rows["kvroute", "kv_aware", "remote"]["target_p50_ms"] > 1.0
    [note] = report["notes"]  # no vllm-router there: its row is left out, and said so
    assert note.startswith("vllm-router row skipped: ") and "make bench-peers" in note
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
