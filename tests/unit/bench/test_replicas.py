"""`kvroute bench replicas`: its flags and its verdicts (the runs themselves are measured by
hand, docs/design.md §15; they take minutes)."""

from __future__ import annotations

import pytest

from kvroute.bench.demo import PolicyResult
from kvroute.bench.replicas import PhaseResult, _phases, _verdicts
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


def test_verdicts_judge_blended_runs_against_one_replica_and_show_local_ones() -> None:
    one, local, blended, shared, killed = (
        p for p in _phases(3) if p.key in ("one", "local", "blended", "shared", "killed")
    )
    base = _result("1 replica", 0.89, 50.0)
    results = [
        PhaseResult(one, base, [base], {}, []),
        PhaseResult(local, _result("local", 0.80, 200.0), [], {}, []),  # shown, not judged
        PhaseResult(blended, _result("blended", 0.875, 59.0), [], {}, []),  # within
        PhaseResult(shared, _result("shared", 0.92, 40.0), [], {}, []),  # better: fine
        PhaseResult(killed, _result("killed", 0.89, 50.0, errors=1), [], {}, []),  # an error
    ]
    lines, ok = _verdicts(results, base)
    assert not ok
    assert lines[0].startswith("shown: 3 replicas, local load")
    assert lines[1].startswith("PASS: 3 replicas, blended:")
    assert lines[2].startswith("PASS: 3 replicas, blended + shared")
    assert "FAIL: 3 replicas, shared, store killed: 1 requests failed" in lines
    lines, ok = _verdicts(results[:4], base)
    assert ok
    slow = PhaseResult(blended, _result("blended", 0.89, 61.0), [], {}, [])
    lines, ok = _verdicts([results[0], slow], base)
    assert not ok and lines[0].startswith("FAIL: 3 replicas, blended: hit rate 89.0% (+0.0")
