"""bench/ingest_vs.py and `kvroute bench ingest --vs`: arguments, finding the peer, the result's
table, JSON and chart (the runs themselves are in tests/benchmark/bench/test_ingest_vs.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kvroute.bench import ingest_vs
from kvroute.bench.report import print_table, save_json
from kvroute.cli import main


def _fake_peer(root: Path, version: str = "1.6.1") -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").write_text("")
    site = root / "lib" / "python3.11" / "site-packages"
    (site / "dynamo" / "indexer").mkdir(parents=True)
    (site / "dynamo" / "indexer" / "__main__.py").write_text("")
    (site / f"ai_dynamo_runtime-{version}.dist-info").mkdir()
    return root


def test_parse_per_message() -> None:
    assert ingest_vs.parse_per_message("1,10,50") == (1, 10, 50)
    assert ingest_vs.parse_per_message(" 7 ") == (7,)
    for bad, message in (("1,x", "integers"), ("0", "1 to 65535"), ("70000", "1 to 65535")):
        with pytest.raises(ValueError, match=message):
            ingest_vs.parse_per_message(bad)


def test_find_dynamo_reads_the_venv_and_its_version(tmp_path: Path) -> None:
    peer = ingest_vs.find_dynamo(_fake_peer(tmp_path / "peers", "1.6.1"))
    assert peer.version == "1.6.1"
    assert peer.python == (tmp_path / "peers" / "bin" / "python").absolute()


def test_find_dynamo_says_how_to_install_it(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text("")  # a venv without ai-dynamo-runtime
    with pytest.raises(ingest_vs.PeerMissing, match="make bench-peers"):
        ingest_vs.find_dynamo(tmp_path)


def test_cli_without_the_peer_exits_2_with_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "ingest", "--vs", "dynamo", "--peers-venv", str(tmp_path / "none")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "make bench-peers" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "decode", "--vs", "dynamo"], "ingest only"),
        (["bench", "ingest", "--events", "10"], "go with ingest --vs"),
        (["bench", "ingest", "--per-message", "1"], "go with ingest --vs"),
        (["bench", "ingest", "--vs", "dynamo", "--per-message", "0"], "1 to 65535"),
        (["bench", "ingest", "--vs", "dynamo", "--events", "0"], "--events"),
    ],
)
def test_cli_refuses_bad_combinations(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_rejects_an_unknown_peer(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "ingest", "--vs", "sglang"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def _system(events_per_s: float, **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "complete": True,
        "seconds": 100_000 / events_per_s if events_per_s else float("nan"),
        "events_per_s": events_per_s,
        "cpu_seconds": 1.5,
        "cores": 0.9,
        "events_per_cpu_s": 66_666.0,
        "rss_mb": 150.0,
        "applied": 100_000,
        "dropped": 0,
        "counters": {"applied/stored": 90_000.0, "applied/removed": 10_000.0},
        "stored_ok": 24,
        "stored": 24,
        "removed_ok": 8,
        "removed": 8,
        "mismatches": 0,
        "mismatched": [],
    }
    row.update(over)
    return row


def _result() -> dict[str, Any]:
    return {
        "events": 100_000,
        "systems": {"kvroute": {}, "dynamo": {"package": "ai-dynamo-runtime==1.6.1"}},
        "runs": [
            {
                "events_per_message": k,
                "events": 100_000,
                "systems": {
                    "kvroute": _system(40_000.0 * k, stored_ok=23, mismatches=1),
                    "dynamo": _system(20_000.0 * k),
                },
            }
            for k in (1, 10)
        ]
        + [
            {
                "events_per_message": 50,
                "events": 100_000,
                "systems": {"kvroute": _system(0.0, complete=False), "dynamo": _system(0.0)},
            }
        ],
    }


def test_result_rows_one_per_run_and_system_with_the_ratio() -> None:
    rows = ingest_vs.result_rows(_result())
    assert [(r[0], r[1]) for r in rows] == [
        (1, "kvroute"),
        (1, "dynamo"),
        (10, "kvroute"),
        (10, "dynamo"),
        (50, "kvroute (incomplete)"),
        (50, "dynamo"),
    ]
    assert all(len(r) == len(ingest_vs.COLUMNS) for r in rows)
    by = {(r[0], r[1]): dict(zip(ingest_vs.COLUMNS, r, strict=True)) for r in rows}
    assert by[(1, "kvroute")]["vs dynamo"] == "2.00×"
    kv, dyn = (by[(1, name)]["events/CPU-s"] for name in ("kvroute", "dynamo"))
    assert by[(1, "kvroute")]["vs dynamo per CPU-s"] == f"{kv / dyn:.2f}×"
    assert by[(1, "dynamo")]["vs dynamo per CPU-s"] == "-"
    assert by[(1, "dynamo")]["vs dynamo"] == "-"
    assert by[(50, "kvroute (incomplete)")]["vs dynamo"] == "-"  # no rate to compare with
    assert by[(1, "kvroute")]["stored ok"] == "23/24"
    assert by[(1, "kvroute")]["mismatches"] == 1
    assert by[(1, "dynamo")]["removed ok"] == "8/8"


def test_result_rows_show_the_publishers_pace() -> None:
    result = _result()
    result["runs"][0]["publisher_seconds"] = 2.0
    rows = ingest_vs.result_rows(result)
    assert rows[0][:3] == [1, "(publisher)", 50_000.0]
    assert rows[0][3:] == ["-"] * (len(ingest_vs.COLUMNS) - 3)
    assert [r[1] for r in rows[1:3]] == ["kvroute", "dynamo"]


def test_table_json_and_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = _result()
    print_table("ingest side by side", ingest_vs.COLUMNS, ingest_vs.result_rows(result))
    out = capsys.readouterr().out
    assert "kvroute" in out and "dynamo" in out and "2.00×" in out
    saved = json.loads(save_json("ingest_vs_dynamo", result, tmp_path).read_text())
    assert json.dumps(saved["runs"]) == json.dumps(result["runs"])  # NaN != NaN
    assert saved["name"] == "ingest_vs_dynamo"
    png = ingest_vs._chart(result, tmp_path / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_process_facts_of_this_process() -> None:
    assert ingest_vs.cpu_seconds(os.getpid()) > 0
    assert ingest_vs.rss_bytes(os.getpid()) > 10 * 2**20
    assert ingest_vs.rss_bytes(2**22 + 12_345) == 0  # no such process
