"""`kvroute demo` end to end on a small workload: the JSON report, the chart, the exit code."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from kvroute.bench.demo import DemoOptions, add_demo_arguments, run_demo_async
from kvroute.bench.workload import ChatWorkload, ChatWorkloadSpec, poisson_arrivals


def test_demo_arguments_build_options() -> None:
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    args = parser.parse_args(["--speed", "3", "--policies", "kv_aware,random", "--no-check"])
    assert args.speed == 3.0
    assert args.policies == "kv_aware,random"
    assert args.no_check is True


async def test_small_demo_writes_report_and_chart(tmp_path: Path) -> None:
    options = DemoOptions(
        speed=8.0,
        workload=ChatWorkloadSpec(groups=4, users_per_group=2, turns=2, system_tokens=512),
        out_dir=tmp_path,
        check=False,
    )
    assert await run_demo_async(options) == 0
    report = json.loads((tmp_path / "demo.json").read_text())
    assert [p["policy"] for p in report["policies"]] == [
        "kv_aware",
        "round_robin",
        "least_loaded",
        "random",
    ]
    for row in report["policies"]:
        assert set(row) >= {
            "policy",
            "hit_rate",
            "ttft_p50_ms",
            "ttft_p90_ms",
            "output_tok_s",
            "load_max_over_mean",
        }
        assert row["errors"] == 0 and row["requests"] == 16
        assert 0.0 <= row["hit_rate"] <= 1.0
    workload = report["workload"]
    assert workload["requests"] == 16 and workload["capacity_req_s"] > 0
    # both figures are rounded to 3 decimals in the report, so compare within that rounding
    expected_rate = workload["load_fraction"] * workload["capacity_req_s"]
    assert workload["load_fraction"] == 0.8
    assert abs(workload["arrival_rate_req_s"] - expected_rate) <= 0.002
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_workload_prompts_have_known_token_lengths() -> None:
    spec = ChatWorkloadSpec(groups=2, users_per_group=3, turns=2, system_tokens=100)
    workload = ChatWorkload(spec)
    assert len(workload.turns) == spec.requests == 12
    first = workload.turns[0]
    messages = workload.messages(first)
    # BOS, <|system|>, the system prompt, <|user|>, the question, <|assistant|>
    assert workload.prompt_tokens(messages) == 4 + spec.system_tokens + first.question_tokens
    # every user's turns come in order, and users of a group share the system prompt
    seen: dict[int, int] = {}
    for turn in workload.turns:
        assert turn.turn == seen.get(turn.user, -1) + 1
        seen[turn.user] = turn.turn
    assert workload.system_prompts[0] != workload.system_prompts[1]
    later = next(t for t in workload.turns if t.turn == 1)
    history = workload.synthetic_history(later)
    assert [m["role"] for m in history] == ["user", "assistant"]


def test_poisson_arrivals_are_seeded_and_have_the_requested_rate() -> None:
    a = poisson_arrivals(2000, 10.0, seed=1)
    assert a == poisson_arrivals(2000, 10.0, seed=1)
    assert all(x < y for x, y in itertools.pairwise(a))
    assert 180 < a[-1] < 220  # 2000 arrivals at 10/s take about 200 s
