"""bench/decode_bench.py at smoke size: returns and saves a sane structure (not speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvroute.bench.decode_bench import run


def test_decode_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = run(size="smoke", out_dir=tmp_path)
    results = data["results"]
    assert {(r["shape"], r["release"]) for r in results} == {("map", "0.33.0"), ("array", "0.22.0")}
    assert {r["decoder"] for r in results} == {"decode_batch", "BatchDecoder"}
    for r in results:
        assert r["events_per_s"] > 0 and r["untyped_msgspec_events_per_s"] > 0
        assert r["ratio_vs_untyped"] == pytest.approx(
            r["events_per_s"] / r["untyped_msgspec_events_per_s"]
        )
        assert r["payload_bytes"] > 0 and r["events_per_batch"] >= 1
    saved = json.loads((tmp_path / "decode.json").read_text())
    assert saved["name"] == "decode" and saved["results"] == results
    assert "decode rate" in capsys.readouterr().out


def test_decode_bench_rejects_unknown_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        run(size="huge", out_dir=tmp_path)
