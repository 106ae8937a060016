"""bench/ingest_vs.py at a tiny size: a real publisher process and `kvroute serve`, alone and
(when `make bench-peers` installed it) next to Dynamo's indexer; structure and correctness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvroute.bench import ingest_vs


def _check(system: dict[str, object], events: int) -> None:
    assert system["complete"] is True
    assert system["applied"] == events and system["dropped"] == 0
    assert (system["stored_ok"], system["removed_ok"]) == (24, 8)
    assert system["mismatches"] == 0
    assert isinstance(system["events_per_s"], float) and system["events_per_s"] > 0
    assert isinstance(system["rss_mb"], float) and system["rss_mb"] > 10


def test_kvroute_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ingest_vs.run(vs=None, events=3_000, per_message=(1, 50), out_dir=tmp_path)
    assert [r["events_per_message"] for r in data["runs"]] == [1, 50]
    assert [r["messages"] for r in data["runs"]] == [3_000, 60]
    for run in data["runs"]:
        assert list(run["systems"]) == ["kvroute"]
        _check(run["systems"]["kvroute"], 3_000)
    saved = json.loads((tmp_path / "ingest_vs_none.json").read_text())
    assert json.dumps(saved["runs"]) == json.dumps(data["runs"])  # NaN != NaN (0 CPU ticks)
    assert (tmp_path / "ingest_vs_none.png").exists()
    assert "kvroute" in capsys.readouterr().out


def test_next_to_dynamo(tmp_path: Path) -> None:
    try:
        ingest_vs.find_dynamo()
    except ingest_vs.PeerMissing:
        pytest.skip("Dynamo's indexer is not installed (make bench-peers)")
    data = ingest_vs.run(vs="dynamo", events=3_000, per_message=(10,), out_dir=tmp_path)
    (run,) = data["runs"]
    assert list(run["systems"]) == ["kvroute", "dynamo"]
    for system in run["systems"].values():
        _check(system, 3_000)
    assert data["systems"]["dynamo"]["package"] == "ai-dynamo-runtime==1.6.1"
    assert (tmp_path / "ingest_vs_dynamo.json").exists()
