"""`kvroute bench trace`: the capacity bisection against fake evaluators, the summary of a run's
records, and the flags (bad values exit 2 before anything starts)."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from kvroute.bench.trace import bisect_time_factor, jittered_factor
from kvroute.bench.trace_summary import RunSummary, TraceRecord, median_run, summarise
from kvroute.cli import main


def _threshold(capacity: float, calls: list[float]) -> Callable[[float], Awaitable[bool]]:
    """A fake run: it meets the SLO when its time factor is at least `capacity`."""

    async def passes(factor: float) -> bool:
        calls.append(factor)
        return factor >= capacity

    return passes


async def test_bisection_from_a_pass_steps_toward_faster_arrivals_then_bisects() -> None:
    calls: list[float] = []
    search = await bisect_time_factor(_threshold(0.3, calls), 1.0, True, steps=5)
    # 0.5 passes, 0.25 fails: bracketed; then geometric midpoints
    assert calls[:2] == [0.5, 0.25]
    assert calls[2] == pytest.approx(math.sqrt(0.5 * 0.25))
    assert len(calls) == 5
    assert search.bracketed
    assert search.passed is not None and search.failed is not None
    assert search.failed < 0.3 <= search.passed
    assert search.passed / search.failed < 2 ** (1 / 4) + 1e-9  # three halvings in log space
    assert search.trials[0] == (1.0, True) and [f for f, _ in search.trials[1:]] == calls


async def test_bisection_from_a_miss_steps_toward_slower_arrivals() -> None:
    calls: list[float] = []
    search = await bisect_time_factor(_threshold(3.0, calls), 1.0, False, steps=4)
    assert calls[:2] == [2.0, 4.0]
    assert search.failed is not None and search.passed is not None
    assert search.failed < 3.0 <= search.passed <= 4.0


async def test_bisection_that_never_brackets_reports_the_bound_it_reached() -> None:
    calls: list[float] = []
    always = await bisect_time_factor(_threshold(0.0, calls), 1.0, True, steps=3)
    assert not always.bracketed and always.passed == 0.125 and always.failed is None
    never = await bisect_time_factor(_threshold(math.inf, calls), 1.0, False, steps=3)
    assert not never.bracketed and never.passed is None and never.failed == 8.0


async def test_bisection_with_no_steps_is_the_start_alone() -> None:
    calls: list[float] = []
    search = await bisect_time_factor(_threshold(0.5, calls), 1.0, True, steps=0)
    assert calls == [] and search.passed == 1.0 and search.trials == [(1.0, True)]
    with pytest.raises(ValueError, match="start"):
        await bisect_time_factor(_threshold(0.5, calls), 0.0, True, steps=1)


def _record(i: int, engine: str, ttft: float | None, cached: int, status: int = 200) -> TraceRecord:
    return TraceRecord(i, engine, status, 100, cached, 2, ttft, None if ttft is None else ttft + 5)


def test_summary_of_a_run() -> None:
    records = [_record(i, f"engine-{i % 2}", float(10 * (i + 1)), 50) for i in range(10)]
    s = summarise("kv_aware", 1.0, records, sim_seconds=5.0, engines=3, slo_ms=75.0)
    assert s.requests == 10 and s.errors == 0
    assert s.hit_rate == 0.5
    assert s.ttft_ms == {"p50": 50.0, "p90": 90.0, "p99": 100.0}
    assert s.e2e_ms["p50"] == 55.0
    assert s.throughput_rps == 2.0
    assert s.slo_attainment == 0.7
    assert s.per_engine == {"engine-0": 5, "engine-1": 5, "engine-2": 0}
    assert s.load_max_over_mean == pytest.approx(1.5)
    assert not s.passes(75.0) and s.passes(90.0)


def test_the_median_of_repeated_runs_decides_a_step() -> None:
    def run(ttft: float) -> RunSummary:
        return summarise("kv_aware", 1.0, [_record(0, "e", ttft, 0)], sim_seconds=1.0, engines=1,
                         slo_ms=100.0)  # fmt: skip

    runs = [run(t) for t in (300.0, 50.0, 90.0)]
    assert median_run(runs) is runs[2]
    # Of an even count the worse middle run: more than half must meet the SLO.
    pair = [run(50.0), run(300.0)]
    assert median_run(pair) is pair[1]
    assert not median_run(pair).passes(100.0)
    with pytest.raises(ValueError):
        median_run([])


def test_a_steps_repeats_run_around_its_factor_the_first_at_it() -> None:
    factors = [jittered_factor(0.8, k, 0.002) for k in range(5)]
    assert factors == pytest.approx([0.8, 0.8 * 1.002, 0.8 * 0.998, 0.8 * 1.004, 0.8 * 0.996])
    assert [jittered_factor(0.8, k, 0.0) for k in range(3)] == [0.8, 0.8, 0.8]  # off


def test_errors_count_as_misses_of_the_slo() -> None:
    records = [_record(i, "engine-0", 10.0, 0) for i in range(8)]
    records += [_record(8, "?", None, 0, status=500), _record(9, "?", None, 0, status=0)]
    s = summarise("round_robin", 1.0, records, sim_seconds=1.0, engines=1, slo_ms=100.0)
    assert s.requests == 8 and s.errors == 2
    assert s.ttft_ms["p90"] == 10.0  # of the answered requests
    assert s.slo_attainment == 0.8
    assert not s.passes(100.0)  # the p90 over all requests falls on an error


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "expected the trace file"),
        (["FILE", "--policies", "kv_aware,nowhere"], "--policies: expected some of"),
        (["FILE", "--policies", "kv_aware,kv_aware"], "each policy once"),
        (["FILE", "--max-requests", "0"], "--max-requests: expected >= 1"),
        (["FILE", "--engines", "0"], "--engines: expected >= 1"),
        (["FILE", "--token-scale", "2"], "--token-scale"),
        (["FILE", "--time-factor", "0"], "--time-factor: expected > 0"),
        (["FILE", "--slo-ms", "-5"], "--slo-ms: expected > 0"),
        (["FILE", "--capacity-steps", "-1"], "--capacity-steps: expected >= 0"),
        (["FILE", "--max-num-batched-tokens", "-1"], "--max-num-batched-tokens: expected >= 0"),
        (["FILE", "--capacity-repeats", "0"], "--capacity-repeats: expected >= 1"),
        (["FILE", "--capacity-jitter", "-0.001"], "--capacity-jitter: expected in [0, 0.1)"),
        (["FILE", "--capacity-jitter", "0.5"], "--capacity-jitter: expected in [0, 0.1)"),
        (["FILE", "--router-setting", "w_load"], "expected NAME=VALUE"),
        (["FILE", "--router-setting", "nowhere=1"], "nowhere"),
        (["FILE", "--policies", "oracle,oracle"], "each policy once"),
        (["FILE", "--vs", "dynamo"], "compares ingest only"),
    ],
)
def test_bad_flags_exit_2_before_anything_starts(
    tmp_path: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}\n')
    args = [str(trace) if f == "FILE" else f for f in flags]
    assert main(["bench", "trace", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_malformed_trace_exits_2_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}\n{')
    assert main(["bench", "trace", str(trace), "--out-dir", str(tmp_path)]) == 2
    assert f"{trace}:2: not JSON" in capsys.readouterr().err


def test_other_benches_take_no_file_and_no_vllm_router(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "decode", "some.jsonl"]) == 2
    assert "takes no FILE" in capsys.readouterr().err
    assert main(["bench", "ingest", "--vs", "vllm-router"]) == 2
    assert "--vs vllm-router goes with trace (kvroute bench trace FILE)" in capsys.readouterr().err


def test_a_request_larger_than_an_engine_exits_2_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.jsonl"
    row = {
        "timestamp": 0,
        "input_length": 10 * 512,
        "output_length": 1,
        "hash_ids": list(range(10)),
    }
    trace.write_text(json.dumps(row) + "\n")
    # 10 hash ids at the default scale: 10 blocks of 16 tokens; 4,096 trace tokens: 8 blocks
    assert main(["bench", "trace", str(trace), "--kv-tokens", "4096"]) == 2
    assert (
        "line 1 needs 11 KV blocks, an engine has 8: raise --kv-tokens" in capsys.readouterr().err
    )


def test_added_latency_is_summarised_over_the_answered_requests() -> None:
    records = [
        TraceRecord(i, "engine-0", 200, 100, 0, 2, 10.0, 20.0, added_ms=float(i)) for i in range(10)
    ]
    records.append(TraceRecord(10, "?", 0, 0, 0, 0, None, None, error="ConnectError"))
    s = summarise("vllm-router:kv_aware", 1.0, records, sim_seconds=1.0, engines=1, slo_ms=50.0)
    assert s.added_ms == {"p50": 4.0, "p90": 8.0, "p99": 9.0}
    assert s.summary()["added_latency_wall_ms"] == {"p50": 4.0, "p90": 8.0, "p99": 9.0}


def test_the_oracle_and_the_peer_are_runs_by_name() -> None:
    from kvroute.bench.trace import TraceOptions

    options = TraceOptions(trace=Path("t"), policies=("kv_aware", "oracle"), vs=("kv_aware",))
    assert options.runs == ("kv_aware", "oracle", "vllm-router:kv_aware")
