"""The kv_aware policy: least uncached prefill plus outstanding load, with an imbalance guard."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from kvroute.core import MatchResult, PolicyName
from kvroute.routing.baseline import least_loaded_decision
from kvroute.routing.scores import decide, healthy_candidates, pick_tied
from kvroute.routing.types import Candidate, CostWeights, Decision

__all__ = ["GUARD_POLICY_NAME", "KvAwarePolicy", "kv_cost"]

GUARD_POLICY_NAME = f"{PolicyName.KV_AWARE}(least_loaded_guard)"
"""`Decision.policy` when the imbalance guard overrode the cost (the engine was least loaded)."""


def kv_cost(
    match: MatchResult | None, outstanding_tokens: int, prompt_tokens: int, weights: CostWeights
) -> float:
    """`w_prefill * (prompt − Σ_medium weight * matched tokens) + w_load * outstanding`.

    Speculative blocks count as GPU blocks only beyond the confirmed prefix
    (max(confirmed, speculative)), so a burst sharing a prefix sticks to one engine before
    its events arrive, without counting a confirmed block twice. At most
    `(prompt_tokens − 1) // block_size` blocks count: vLLM computes at least one prompt token,
    so a fully cached prompt still prefills its last block (pinned by
    test_a_fully_cached_prompt_still_prefills_its_last_block).
    """
    saved = 0.0
    if match is not None and match.block_size > 0 and prompt_tokens > 0:
        size = match.block_size
        gpu = weights.medium_weight("GPU")
        confirmed = [(weights.medium_weight(m), n) for m, n in match.by_medium.items() if n > 0]
        # Blocks the index did not attribute to a medium count as GPU blocks.
        confirmed.append((gpu, max(0, match.blocks - sum(n for _, n in confirmed))))
        # Speculative blocks beyond the confirmed prefix sit at its end, so the cap cuts them
        # first; among confirmed blocks (whose order is unknown) it cuts the cheapest first.
        budget = (prompt_tokens - 1) // size
        for weight, blocks in sorted(confirmed, reverse=True):
            used = min(blocks, budget)
            saved += weight * used * size
            budget -= used
        saved += gpu * min(budget, max(0, match.speculative_blocks - match.blocks)) * size
    prefill = max(0.0, prompt_tokens - min(saved, float(prompt_tokens)))
    return weights.w_prefill * prefill + weights.w_load * outstanding_tokens


class KvAwarePolicy:
    """Choose the healthy engine with the lowest `kv_cost`; ties broken by a seeded random choice.

    Guard: when outstanding tokens over the healthy candidates differ by more than
    `weights.imbalance_tokens`, choose least-loaded instead (`Decision.policy` says so).
    """

    name: str = PolicyName.KV_AWARE

    def __init__(self, *, seed: int = 0, weights: CostWeights | None = None) -> None:
        self.weights = weights if weights is not None else CostWeights()
        self._rng = random.Random(seed)

    def choose(
        self,
        candidates: Sequence[Candidate],
        matches: Mapping[str, MatchResult],
        prompt_tokens: int,
    ) -> Decision:
        healthy = healthy_candidates(candidates)
        costs = {
            c.name: kv_cost(matches.get(c.name), c.outstanding_tokens, prompt_tokens, self.weights)
            for c in healthy
        }
        loads = [c.outstanding_tokens for c in healthy]
        if max(loads) - min(loads) > self.weights.imbalance_tokens:
            return least_loaded_decision(GUARD_POLICY_NAME, self._rng, candidates, matches, costs)
        ordered = sorted(healthy, key=lambda c: (costs[c.name], c.outstanding_tokens, c.name))
        best = costs[ordered[0].name]
        tied = sum(1 for c in ordered if math.isclose(costs[c.name], best, abs_tol=1e-9))
        return decide(self.name, pick_tied(self._rng, ordered, tied), candidates, matches, costs)
