"""`kvroute bench restart` at a tiny size: both restarts run, the warm one restores blocks, and
neither claims a block its engine does not hold (structure and safety, not speed)."""

from __future__ import annotations

from pathlib import Path

from kvroute.bench.restart import RestartOptions, run


def test_restart_bench_runs_warm_and_cold_and_never_claims_what_engines_lack(
    tmp_path: Path,
) -> None:
    result = run(
        RestartOptions(
            engines=2,
            warmup_requests=40,
            groups=10,
            down_s=0.2,
            buffer_steps=10_000,
            out_dir=tmp_path,
        )
    )
    assert (tmp_path / "restart.json").exists()
    warm, cold = result["warm"], result["cold"]
    assert warm["restored_blocks"] > 0 and cold["restored_blocks"] == 0
    assert warm["claimed_not_held"] == 0 and cold["claimed_not_held"] == 0
