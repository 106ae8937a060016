"""The simulator's chunked prefill: a step computes at most `max_num_batched_tokens` prompt
tokens, requests part-way through their prefill first, the first token when the prompt is done."""

from __future__ import annotations

import pytest

from kvroute.cli import main
from kvroute.events.vllm_events import VllmBlockStored
from kvroute.sim.scheduler import SchedulerConfig, SimRequest, SimScheduler


def sched(budget: int | None, **kw: object) -> SimScheduler:
    cfg = {"block_size": 2, "num_gpu_blocks": 64, "max_num_seqs": 8,
           "prefill_tok_per_s": 1000.0, "decode_step_s": 0.01,
           "max_num_batched_tokens": budget}  # fmt: skip
    cfg.update(kw)
    return SimScheduler(SchedulerConfig(**cfg))  # type: ignore[arg-type]


def req(rid: str, prompt: list[int], out: list[int], arrival: float = 0.0) -> SimRequest:
    return SimRequest(rid, prompt, out, arrival)


def steps(s: SimScheduler) -> list[tuple[int, list[str]]]:
    """Each step's prefill tokens and the requests that emitted a token in it, until idle."""
    seen = []
    while (out := s.step()) is not None:
        seen.append((out.prefill_tokens, [r.request_id for r in out.advanced]))
    return seen


def test_a_long_prompt_is_prefilled_in_budget_sized_chunks_and_answers_after_the_last() -> None:
    s = sched(4)
    a = req("a", list(range(1, 11)), [7, 8])  # 10 prompt tokens, budget 4: 4 + 4 + 2
    s.add(a)
    assert steps(s) == [(4, []), (4, []), (2, ["a"]), (0, ["a"])]
    # Three prefill steps of 4, 4 and 2 tokens at 1000 tok/s, each with a 10 ms step.
    assert a.ttft == pytest.approx(0.010 + 0.03)
    assert a.e2e == pytest.approx(a.ttft + 0.01)
    assert a.emitted == 2


def test_without_a_budget_the_whole_prompt_is_prefilled_in_its_admitting_step() -> None:
    s = sched(None)
    a = req("a", list(range(1, 11)), [7, 8])
    s.add(a)
    assert steps(s) == [(10, ["a"]), (0, ["a"])]
    assert a.ttft == pytest.approx(0.010 + 0.01)


def test_a_request_ahead_of_a_long_prompt_is_not_held_by_its_prefill() -> None:
    """Whole prompts in one step hold a short request admitted with a long one for the long
    one's whole prefill; with chunks it is done in the first step (admission order)."""
    long_prompt = list(range(100, 140))  # 40 tokens
    for budget, short_ttft in ((None, 0.044 + 0.01), (8, 0.008 + 0.01)):
        s = sched(budget)
        short = req("short", [1, 2, 3, 4], [5])
        long = req("long", long_prompt, [6])
        s.add(short)
        s.add(long)
        steps(s)
        assert short.ttft == pytest.approx(short_ttft), budget
        assert long.ttft is not None and long.ttft >= 0.040


def test_requests_part_way_through_their_prefill_come_before_new_ones() -> None:
    s = sched(6)
    first = req("first", list(range(1, 11)), [9])  # 10 tokens: 6 then 4
    s.add(first)
    out = s.step()
    assert out is not None and out.prefill_tokens == 6 and out.advanced == []
    later = req("later", [50, 51, 52, 53], [9], arrival=out.end)
    s.add(later)
    out = s.step()  # first's last 4 tokens, then 2 of later's 4
    assert out is not None and out.prefill_tokens == 6
    assert [r.request_id for r in out.advanced] == ["first"]
    assert later.first_token_time is None
    out = s.step()
    assert out is not None and [r.request_id for r in out.advanced] == ["later"]


def test_blocks_are_stored_as_each_chunk_completes_them() -> None:
    s = sched(4)
    s.add(req("a", [1, 2, 3, 4, 5, 6, 7, 8], [9]))
    first = s.step()
    second = s.step()
    assert first is not None and second is not None
    (stored,) = first.events
    assert isinstance(stored, VllmBlockStored) and stored.token_ids == [1, 2, 3, 4]
    (stored,) = second.events
    assert isinstance(stored, VllmBlockStored) and stored.token_ids == [5, 6, 7, 8]
    assert stored.parent_block_hash is not None


def test_a_cached_prefix_is_not_counted_against_the_budget() -> None:
    s = sched(4)
    s.add(req("warm", [1, 2, 3, 4, 5, 6], [9]))
    steps(s)
    b = req("b", [1, 2, 3, 4, 5, 6, 7, 8], [9], arrival=1.0)  # 6 cached (3 blocks), 2 to do
    s.add(b)
    assert steps(s) == [(2, ["b"])]
    assert b.cached_tokens == 6


def test_the_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=0)


def test_kvroute_sim_refuses_a_negative_budget(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--max-num-batched-tokens", "-1"]) == 2
    assert "--max-num-batched-tokens: expected >= 0" in capsys.readouterr().err
