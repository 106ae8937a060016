"""`kvroute bench replicas`: its flags and its verdicts (the runs themselves are measured by
hand, docs/design.md §15; they take minutes)."""

from __future__ import annotations

import pytest

from kvroute.bench.demo import PolicyResult
from kvroute.bench.replicas import Phase, PhaseResult, _phases, _verdicts
from kvroute.cli import main


def _result(name: str, hit: float, p90: float, errors: int = 0) -> PolicyResult:
    return PolicyResult(name, hit, 30.0, p90, 1000.0, 1.0, 384, errors, {}, 10.0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--phases", "one,nowhere"], "--phases: expected some of"),
        (["--replicas", "1"], "--replicas: expected >= 2"),
        (["--repeat", "0"], "--repeat: expected >= 1"),
        (["--replica-setting", "w_load"], "--replica-setting: expected NAME=VALUE"),
        (["--replica-setting", "no_such_setting=1"], "no_such_setting"),
    ],
)
def test_bad_flags_exit_2_before_anything_starts(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "replicas", *flags]) == 2
    assert message in capsys.readouterr().err


def _phase(phase: Phase, *runs: PolicyResult) -> PhaseResult:
    return PhaseResult(phase, runs[0], list(runs), {}, [])


def test_verdicts_judge_replicas_sharing_a_store_and_show_the_others() -> None:
    one, local, blended, shared, killed = (
        p for p in _phases(3) if p.key in ("one", "local", "blended", "shared", "killed")
    )
    base = _phase(one, _result("1 replica", 0.89, 50.0))
    results = [
        base,
        _phase(local, _result("local", 0.80, 200.0)),  # shown, not judged
        _phase(blended, _result("blended", 0.80, 90.0)),  # no store: shown, not judged
        _phase(shared, _result("shared", 0.92, 40.0)),  # better: fine
        _phase(killed, _result("killed", 0.80, 90.0, errors=1)),  # judged on errors only
    ]
    lines, ok = _verdicts(results, base)
    assert not ok
    assert lines[0].startswith("shown: 3 replicas, local load")
    assert lines[1].startswith("shown: 3 replicas, blended:")
    assert lines[2].startswith("PASS: 3 replicas, blended + shared")
    assert "FAIL: 3 replicas, shared, store killed: 1 requests failed" in lines
    lines, ok = _verdicts(results[:4], base)
    assert ok
    local_shared = next(p for p in _phases(3) if p.key == "local-shared")
    lines, ok = _verdicts([base, _phase(local_shared, _result("ls", 0.7, 300.0))], base)
    assert not ok and lines[0].startswith("FAIL: 3 replicas, local + shared")
    slow = _phase(shared, _result("shared", 0.89, 61.0))
    lines, ok = _verdicts([base, slow], base)
    assert not ok and lines[0].startswith(
        "FAIL: 3 replicas, blended + shared: hit rate 89.0% (+0.0"
    )


def test_verdicts_take_the_median_run_so_one_run_that_tipped_over_does_not_decide() -> None:
    one, shared = (p for p in _phases(3) if p.key in ("one", "shared"))
    base = _phase(
        one, _result("1", 0.89, 50.0), _result("1", 0.70, 400.0), _result("1", 0.88, 60.0)
    )
    assert base.ttft_p90_ms == 60.0 and base.hit_rate == 0.88
    near = _phase(
        shared, _result("s", 0.88, 70.0), _result("s", 0.87, 65.0), _result("s", 0.60, 900.0)
    )
    lines, ok = _verdicts([base, near], base)
    assert ok and lines[0].startswith("PASS: 3 replicas, blended + shared: hit rate 87.0%")
    assert "70 ms = 1.17× one replica's 60 ms" in lines[0]
