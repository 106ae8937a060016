"""One suite every routing policy must pass (docs/architecture.md), parametrised over PolicyName."""

from __future__ import annotations

import random

import pytest

from kvroute.core import MatchResult, PolicyName
from kvroute.routing import Candidate, Decision, make_policy, needs_tokens


def _fleet(n: int, *, unhealthy: tuple[int, ...] = ()) -> list[Candidate]:
    return [Candidate(f"engine-{i}", i not in unhealthy, 0, 0) for i in range(n)]


def _gpu(blocks: int, size: int = 16) -> MatchResult:
    return MatchResult(
        blocks=blocks, tokens=blocks * size, by_medium={"GPU": blocks}, block_size=size
    )


def _check_decision_shape(decision: Decision, candidates: list[Candidate]) -> None:
    healthy = {c.name for c in candidates if c.healthy}
    assert decision.engine in healthy
    assert decision.ranked[0] == decision.engine
    assert sorted(decision.ranked) == sorted(healthy)  # fallback order: every healthy, once
    assert [s.name for s in decision.scores] == [c.name for c in candidates]
    for score in decision.scores:
        assert score.healthy == (score.name in healthy)
        if not score.healthy:
            assert score.cost is None
        assert score.stale is False


@pytest.mark.parametrize("policy_name", list(PolicyName))
def test_never_chooses_an_unhealthy_engine(policy_name: PolicyName) -> None:
    policy = make_policy(policy_name, seed=3)
    candidates = _fleet(5, unhealthy=(0, 2, 4))
    # the unhealthy engines hold the whole prompt and carry no load: still never chosen
    matches = {"engine-0": _gpu(10), "engine-2": _gpu(10), "engine-4": _gpu(10)}
    for _ in range(50):
        decision = policy.choose(candidates, matches, 160)
        assert decision.engine in {"engine-1", "engine-3"}
        _check_decision_shape(decision, candidates)


@pytest.mark.parametrize("policy_name", list(PolicyName))
def test_single_healthy_engine_is_always_chosen(policy_name: PolicyName) -> None:
    policy = make_policy(policy_name)
    candidates = _fleet(3, unhealthy=(0, 1))
    for _ in range(10):
        decision = policy.choose(candidates, {}, 0)
        assert decision.engine == "engine-2"
        assert decision.ranked == ["engine-2"]


@pytest.mark.parametrize("policy_name", list(PolicyName))
def test_same_seed_same_decisions(policy_name: PolicyName) -> None:
    rng = random.Random(7)
    calls = []
    for _ in range(40):
        cands = [
            Candidate(f"e{i}", rng.random() > 0.2 or i == 0, rng.choice([0, 100]), rng.randrange(3))
            for i in range(4)
        ]
        matches = {f"e{i}": _gpu(rng.randrange(3)) for i in range(4) if rng.random() > 0.5}
        calls.append((cands, matches, 64))
    a, b = make_policy(policy_name, seed=11), make_policy(policy_name, seed=11)
    runs_a = [a.choose(*call) for call in calls]
    runs_b = [b.choose(*call) for call in calls]
    assert runs_a == runs_b


@pytest.mark.parametrize("policy_name", list(PolicyName))
def test_policy_name_is_reported(policy_name: PolicyName) -> None:
    policy = make_policy(policy_name)
    assert policy.name == policy_name
    assert policy.choose(_fleet(2), {}, 10).policy == policy_name


@pytest.mark.parametrize("policy_name", list(PolicyName))
def test_scores_report_matches_apart_from_speculation(policy_name: PolicyName) -> None:
    policy = make_policy(policy_name)
    match = MatchResult(
        blocks=3, tokens=48, by_medium={"GPU": 2, "CPU": 1}, speculative_blocks=5, block_size=16
    )
    candidates = [Candidate("a", True, 7, 1), Candidate("b", True, 0, 0)]
    decision = policy.choose(candidates, {"a": match}, 100)
    a, b = decision.scores
    assert (a.blocks_matched, a.tokens_matched, a.by_medium, a.speculative_blocks) == (
        3,
        48,
        {"GPU": 2, "CPU": 1},
        5,
    )
    assert a.outstanding_tokens == 7
    assert (b.blocks_matched, b.tokens_matched, b.by_medium, b.speculative_blocks) == (0, 0, {}, 0)


@pytest.mark.parametrize("policy_name", list(PolicyName))
def test_matches_for_unknown_engines_are_ignored(policy_name: PolicyName) -> None:
    decision = make_policy(policy_name).choose(_fleet(2), {"gone": _gpu(9)}, 160)
    assert decision.engine in {"engine-0", "engine-1"}


@pytest.mark.parametrize("policy_name", list(PolicyName))
def test_every_healthy_engine_gets_traffic_when_idle_and_equal(policy_name: PolicyName) -> None:
    # With no prefix anywhere and equal load, no policy may pin everything on one engine.
    policy = make_policy(policy_name, seed=5)
    chosen = {policy.choose(_fleet(4), {}, 100).engine for _ in range(200)}
    assert chosen == {f"engine-{i}" for i in range(4)}


@pytest.mark.parametrize("policy_name", list(PolicyName))
def test_no_healthy_candidate_is_a_clear_value_error(policy_name: PolicyName) -> None:
    policy = make_policy(policy_name)
    for candidates in ([], _fleet(2, unhealthy=(0, 1))):
        with pytest.raises(ValueError, match="expected at least one healthy candidate"):
            policy.choose(candidates, {}, 10)


def test_unknown_policy_name_is_a_config_error() -> None:
    from kvroute.errors import ConfigError

    with pytest.raises(ConfigError, match="expected one of kv_aware, least_loaded"):
        make_policy("fastest")  # type: ignore[arg-type]


@pytest.mark.parametrize("policy_name", list(PolicyName))
def test_a_plain_string_naming_a_policy_is_accepted(policy_name: PolicyName) -> None:
    assert make_policy(policy_name.value).name == policy_name.value  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(PolicyName))
def test_only_a_policy_that_reads_matches_needs_tokens(name: PolicyName) -> None:
    policy = make_policy(name)
    assert needs_tokens(policy) is (name is PolicyName.KV_AWARE)
    if not needs_tokens(policy):  # its choice is the same whatever the prompt holds or counts
        fleet = _fleet(3)
        with_matches = make_policy(name).choose(fleet, {"engine-2": _gpu(8)}, 4096)
        without = make_policy(name).choose(fleet, {}, 1)
        assert with_matches.ranked == without.ranked
