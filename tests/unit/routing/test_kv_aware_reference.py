"""kv_aware against an obviously correct reference over random fleets (docs/design.md §6)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.core import MatchResult
from kvroute.routing import GUARD_POLICY_NAME, Candidate, CostWeights, KvAwarePolicy

MEDIA = {"GPU": 1.0, "CPU": 0.8}


def _reference_cost(
    m: MatchResult | None, load: int, prompt: int, queued: float, w_queue: float
) -> float:
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
    return max(0.0, prompt - saved) + W_LOAD * load + w_queue * queued


W_LOAD = CostWeights().w_load
W_QUEUE = CostWeights().w_queue
W_QUEUE_SATURATED = CostWeights().w_queue_evicting  # no engine here is evicting
SATURATED = CostWeights().saturated_queue_ratio
CAP = 20_000


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
        queued = draw(st.floats(0, 5_000))
        candidates.append(Candidate(name, healthy, load, draw(st.integers(0, 10)), queued))
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
@given(_fleets(), st.integers(0, 2**16), st.booleans())
def test_choice_matches_the_reference(
    fleet: tuple[list[Candidate], dict[str, MatchResult], int], seed: int, capped: bool
) -> None:
    candidates, matches, prompt = fleet
    weights = CostWeights(imbalance_tokens=CAP if capped else 0)
    decision = KvAwarePolicy(seed=seed, weights=weights).choose(candidates, matches, prompt)
    healthy = [c for c in candidates if c.healthy]
    least = min(c.outstanding_tokens for c in healthy)
    # Saturated: every healthy engine has at least SATURATED × the prompt queued.
    full = prompt > 0 and all(c.queued_prefill_tokens >= SATURATED * prompt for c in healthy)
    w_queue = W_QUEUE_SATURATED if full else W_QUEUE
    costs = {
        c.name: _reference_cost(
            matches.get(c.name), c.outstanding_tokens, prompt, c.queued_prefill_tokens, w_queue
        )
        for c in healthy
    }
    for score in decision.scores:
        if score.healthy:
            assert score.cost is not None
            assert abs(score.cost - costs[score.name]) < 1e-6
        else:
            assert score.cost is None
    allowed = {c.name for c in healthy if not capped or c.outstanding_tokens - least <= CAP}
    best = min(costs[n] for n in allowed)
    assert decision.engine in allowed
    assert costs[decision.engine] <= best + 1e-6
    beaten = any(costs[c.name] < best - 1e-6 for c in healthy if c.name not in allowed)
    assert decision.policy == (GUARD_POLICY_NAME if beaten else "kv_aware")
    # allowed engines first, each group by cost
    ranked_allowed = [n for n in decision.ranked if n in allowed]
    assert decision.ranked[: len(allowed)] == ranked_allowed
    tail = [costs[n] for n in decision.ranked[1 : len(allowed)]]
    assert tail == sorted(tail)
    rest = [costs[n] for n in decision.ranked[len(allowed) :]]
    assert rest == sorted(rest)
    assert sorted(decision.ranked) == sorted(c.name for c in healthy)
