"""`kvroute demo --write-trace`: the demo's chat workload as a Mooncake trace that shares hash ids
exactly where the demo's prompts share tokens."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from kvroute.bench.chat_trace import chat_trace_rows, write_chat_trace
from kvroute.bench.trace_workload import TokenSynthesizer, load_trace, parse_trace_line
from kvroute.bench.workload import ChatWorkload, ChatWorkloadSpec

SPEC = ChatWorkloadSpec(groups=3, users_per_group=2, turns=3, system_tokens=100, seed=7)


def test_one_line_per_request_in_the_demos_order_with_rising_arrivals() -> None:
    rows = list(chat_trace_rows(SPEC, 8.0))
    assert len(rows) == SPEC.requests
    times = [r["timestamp"] for r in rows]
    assert times == sorted(times) and times[0] == 0
    for i, row in enumerate(rows):
        parsed = parse_trace_line(json.dumps(row), i, i + 1)
        assert parsed.input_length == 512 * len(parsed.hash_ids)
        assert parsed.output_length == SPEC.answer_tokens * 32  # 1/32 scale: 100 tokens again


def test_ids_are_shared_by_a_group_and_grow_along_a_users_conversation() -> None:
    rows = list(chat_trace_rows(SPEC, 8.0))
    workload = ChatWorkload(SPEC)  # the same order and question lengths as the demo
    system_ids = -(-SPEC.system_tokens // 16)
    by_user: dict[int, list[list[int]]] = {}
    for turn, row in zip(workload.turns, rows, strict=True):
        ids = row["hash_ids"]
        by_user.setdefault(turn.user, []).append(ids)
        question_ids = -(-turn.question_tokens // 16)  # the demo's own question length
        assert ids[-question_ids:] == list(range(ids[-1] - question_ids + 1, ids[-1] + 1))
    for user, prompts in by_user.items():
        group = user // SPEC.users_per_group
        peer = by_user[group * SPEC.users_per_group + (1 - user % SPEC.users_per_group)]
        assert prompts[0][:system_ids] == peer[0][:system_ids]  # the group's system prompt
        for before, after in itertools.pairwise(prompts):
            assert after[: len(before)] == before  # the next turn extends this one
            answer = after[len(before) : len(before) + -(-SPEC.answer_tokens // 16)]
            assert answer and min(answer) > max(before)  # a new answer, unique to this turn
    groups = {tuple(by_user[g * SPEC.users_per_group][0][:system_ids]) for g in range(SPEC.groups)}
    assert len(groups) == SPEC.groups  # each group its own system prompt


def test_the_trace_loads_and_its_prompts_share_blocks_where_ids_do(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    assert write_chat_trace(path, SPEC, 4.0) == SPEC.requests
    requests = load_trace(path)
    synth = TokenSynthesizer()
    a, b = requests[0], next(r for r in requests[1:] if r.hash_ids[0] == requests[0].hash_ids[0])
    shared = 0
    while a.hash_ids[shared] == b.hash_ids[shared]:
        shared += 1
    pa, pb = synth.prompt(a), synth.prompt(b)
    n = shared * synth.scaling.tokens_per_hash
    assert pa[:n] == pb[:n] and pa[n : n + 16] != pb[n : n + 16]


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan"), float("inf")])
def test_a_rate_that_is_not_positive_and_finite_is_refused(rate: float) -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        list(chat_trace_rows(SPEC, rate))
