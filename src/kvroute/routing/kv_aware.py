"""The kv_aware policy: the lowest predicted time to first token, queued plus uncached prefill."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import replace

from kvroute.core import MatchResult, PolicyName
from kvroute.routing.scores import decide, healthy_candidates, pick_tied
from kvroute.routing.types import Candidate, CostWeights, Decision

__all__ = [
    "GUARD_POLICY_NAME",
    "KvAwarePolicy",
    "evicted_tokens",
    "kv_cost",
    "saturated",
    "uncached_prefill",
]

GUARD_POLICY_NAME = f"{PolicyName.KV_AWARE}(least_loaded_guard)"
"""`Decision.policy` when the imbalance cap ruled out the engine of lowest cost."""


def uncached_prefill(match: MatchResult | None, prompt_tokens: int, weights: CostWeights) -> float:
    """`prompt − Σ_medium weight * matched tokens`: the prompt tokens the engine must prefill.

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
    return max(0.0, prompt_tokens - min(saved, float(prompt_tokens)))


def evicted_tokens(uncached: float, queued_prefill_tokens: float, free_kv_tokens: float) -> float:
    """Cached tokens an engine would evict to prefill `uncached` more: what the prefill queued
    there and this prompt need beyond the pool's unfilled part (an engine's pool evicts its
    least recently used cached blocks only once no unfilled block is left; vLLM's and
    src/kvroute/sim/block_pool.py's allocators both do)."""
    room = max(0.0, free_kv_tokens - max(0.0, queued_prefill_tokens))
    return max(0.0, uncached - room)


def kv_cost(
    match: MatchResult | None,
    outstanding_tokens: int,
    prompt_tokens: int,
    weights: CostWeights,
    queued_prefill_tokens: float = 0.0,
    free_kv_tokens: float | None = None,
) -> float:
    """`w_prefill * uncached + w_queue * queued prefill + w_evict * evicted + w_load * load`.

    With the default weights the first two terms are the engine's predicted time to first
    token in prefill tokens (the simulator's and vLLM's step time grows with the prefill tokens
    it computes, src/kvroute/sim/scheduler.py). The third is what the choice costs later
    requests: on an engine whose pool is full, every uncached token prefilled there pushes a
    cached one out, so a prefix copied to a second engine evicts prefixes others would have hit
    there (`evicted_tokens`; 0 while the pool size is unknown, `free_kv_tokens` None). The last
    one breaks ties by load.
    """
    uncached = uncached_prefill(match, prompt_tokens, weights)
    cost = (
        weights.w_prefill * uncached
        + weights.w_queue * max(0.0, queued_prefill_tokens)
        + weights.w_load * outstanding_tokens
    )
    if free_kv_tokens is not None and weights.w_evict:
        cost += weights.w_evict * evicted_tokens(uncached, queued_prefill_tokens, free_kv_tokens)
    return cost


def _queue_weight_for(
    weights: CostWeights, healthy: Sequence[Candidate], prompt_tokens: int
) -> CostWeights:
    """`weights` with `w_queue` moved toward `w_queue_evicting` by the share of healthy engines
    whose pools are evicting (all: `w_queue_evicting`; none: `w_queue` unchanged), or all the
    way while the fleet is saturated for this prompt (`saturated`)."""
    if weights.w_queue_evicting == weights.w_queue:
        return weights
    if saturated(healthy, prompt_tokens, weights.saturated_queue_ratio):
        share = 1.0
    else:
        share = sum(1 for c in healthy if c.evicting) / len(healthy)
        if not share:
            return weights
    w_queue = weights.w_queue + (weights.w_queue_evicting - weights.w_queue) * share
    return replace(weights, w_queue=w_queue)


def saturated(healthy: Sequence[Candidate], prompt_tokens: int, ratio: float) -> bool:
    """Whether even the least queued of `healthy` has `ratio` × `prompt_tokens` queued for
    prefill (False when `ratio` is 0 or nothing is healthy): sending the prompt anywhere but to
    its prefix then waits anyway, and its uncached prefill delays every request queued after it."""
    if ratio <= 0 or not healthy or prompt_tokens <= 0:
        return False
    return min(c.queued_prefill_tokens for c in healthy) >= ratio * prompt_tokens


class KvAwarePolicy:
    """Choose the healthy engine with the lowest `kv_cost`; ties broken by a seeded random choice.

    Cap (off unless `weights.imbalance_tokens` > 0): only engines within that many outstanding
    tokens of the least loaded healthy one compete, still by cost, so a capped choice keeps
    whatever prefix the remaining engines hold (`Decision.policy` says when the cap decided).
    """

    name: str = PolicyName.KV_AWARE
    needs_tokens: bool = True  # matches need the prompt's ids (types.needs_tokens)

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
        weights = _queue_weight_for(self.weights, healthy, prompt_tokens)
        costs = {
            c.name: kv_cost(
                matches.get(c.name),
                c.outstanding_tokens,
                prompt_tokens,
                weights,
                c.queued_prefill_tokens,
                c.free_kv_tokens,
            )
            for c in healthy
        }
        ordered = sorted(healthy, key=lambda c: (costs[c.name], c.outstanding_tokens, c.name))
        policy = self.name
        cap = self.weights.imbalance_tokens
        least = min(c.outstanding_tokens for c in healthy)
        allowed = [c for c in ordered if cap <= 0 or c.outstanding_tokens - least <= cap]
        if allowed[0] is not ordered[0]:
            policy = GUARD_POLICY_NAME
        # The fallback order, too, tries the allowed engines first.
        ordered = allowed + [c for c in ordered if cap > 0 and c.outstanding_tokens - least > cap]
        best = costs[ordered[0].name]
        # Allowed engines lead `ordered` by cost, so the tied ones are its first `tied`.
        tied = sum(1 for c in allowed if math.isclose(costs[c.name], best, abs_tol=1e-9))
        ranked = pick_tied(self._rng, ordered, tied)
        return decide(policy, ranked, candidates, matches, costs, weights.w_queue)
