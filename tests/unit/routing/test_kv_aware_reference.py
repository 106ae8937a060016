"""kv_aware against an obviously correct reference over random fleets (docs/architecture.md)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.core import MatchResult
from kvroute.routing import GUARD_POLICY_NAME, Candidate, CostWeights, KvAwarePolicy

MEDIA = {"GPU": 1.0, "CPU": 0.8}


def _reference_cost(m: MatchResult | None, load: int, prompt: int) -> float:
    """The formula of docs/architecture.md ("Cost") written out the long way, block by block:
    confirmed blocks best medium first, then speculative ones, at most (prompt − 1) // block_size
    of them."""
    weights: list[float] = []
    if m is not None:
        for medium, blocks in m.by_medium.items():
            weights += [MEDIA.get(medium, 0.5)] * blocks
        weights.sort(reverse=True)
        weights += [1.0] * max(0, m.speculative_blocks - m.blocks)
        usable = max(0, (prompt - 1) // m.block_size)
        saved = sum(w * m.block_size for w in weights[:usable])
    else:
        saved = 0.0
    return max(0.0, prompt - saved) + W_LOAD * load


W_LOAD = CostWeights().w_load


@st.composite
def _fleets(draw: st.DrawFn) -> tuple[list[Candidate], dict[str, MatchResult], int]:
    n = draw(st.integers(1, 6))
    size = draw(st.sampled_from([8, 16, 32]))
    prompt_blocks = draw(st.integers(0, 40))
    prompt = prompt_blocks * size + draw(st.integers(0, size - 1))
    candidates, matches = [], {}
    for i in range(n):
        name = f"e{i}"
        healthy = draw(st.booleans()) or i == 0
        load = draw(st.integers(0, 60_000))
        candidates.append(Candidate(name, healthy, load, draw(st.integers(0, 10))))
        if draw(st.booleans()):
            gpu = draw(st.integers(0, prompt_blocks))
            cpu = draw(st.integers(0, prompt_blocks - gpu))
            disk = draw(st.integers(0, prompt_blocks - gpu - cpu))
            by_medium = {k: v for k, v in (("GPU", gpu), ("CPU", cpu), ("DISK", disk)) if v}
            blocks = gpu + cpu + disk
            spec = draw(st.integers(0, prompt_blocks))
            matches[name] = MatchResult(
                blocks=blocks,
                tokens=blocks * size,
                by_medium=by_medium,
                speculative_blocks=spec,
                block_size=size,
            )
    return candidates, matches, prompt


@settings(max_examples=300, deadline=None)
@given(_fleets(), st.integers(0, 2**16))
def test_choice_matches_the_reference(
    fleet: tuple[list[Candidate], dict[str, MatchResult], int], seed: int
) -> None:
    candidates, matches, prompt = fleet
    decision = KvAwarePolicy(seed=seed).choose(candidates, matches, prompt)
    healthy = [c for c in candidates if c.healthy]
    loads = [c.outstanding_tokens for c in healthy]
    costs = {
        c.name: _reference_cost(matches.get(c.name), c.outstanding_tokens, prompt) for c in healthy
    }
    for score in decision.scores:
        if score.healthy:
            assert score.cost is not None
            assert abs(score.cost - costs[score.name]) < 1e-6
        else:
            assert score.cost is None
    chosen = next(c for c in healthy if c.name == decision.engine)
    if max(loads) - min(loads) > CostWeights().imbalance_tokens:
        assert decision.policy == GUARD_POLICY_NAME
        assert chosen.outstanding_tokens == min(loads)
    else:
        assert decision.policy == "kv_aware"
        assert costs[chosen.name] <= min(costs.values()) + 1e-6
        ranked_costs = [costs[name] for name in decision.ranked]
        assert ranked_costs[1:] == sorted(ranked_costs[1:])
    assert sorted(decision.ranked) == sorted(c.name for c in healthy)
