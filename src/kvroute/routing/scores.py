"""Per-engine score rows shared by every policy: what a candidate holds of the prompt, its load."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from kvroute.core import MatchResult
from kvroute.routing.types import Candidate, Decision, EngineScore

__all__ = ["decide", "healthy_candidates", "least_loaded_order", "pick_tied", "score_row"]

_NO_MATCH = MatchResult()


def score_row(candidate: Candidate, match: MatchResult | None, cost: float | None) -> EngineScore:
    """The score row of one candidate; unhealthy candidates never carry a cost."""
    m = match if match is not None else _NO_MATCH
    return EngineScore(
        name=candidate.name,
        blocks_matched=m.blocks,
        tokens_matched=m.tokens,
        by_medium=dict(m.by_medium),
        speculative_blocks=m.speculative_blocks,
        outstanding_tokens=candidate.outstanding_tokens,
        cost=cost if candidate.healthy else None,
        healthy=candidate.healthy,
        queued_prefill_tokens=candidate.queued_prefill_tokens,
        free_kv_tokens=candidate.free_kv_tokens,
        evicting=candidate.evicting,
    )


def healthy_candidates(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The healthy candidates; a caller that broke the "at least one healthy" precondition
    gets a clear ValueError instead of an arbitrary failure deep inside a policy."""
    healthy = [c for c in candidates if c.healthy]
    if not healthy:
        raise ValueError(f"choose: expected at least one healthy candidate, got {len(candidates)}")
    return healthy


def least_loaded_order(healthy: Sequence[Candidate]) -> list[Candidate]:
    """Healthy candidates, least loaded first: outstanding tokens, then in flight, then name."""
    return sorted(healthy, key=lambda c: (c.outstanding_tokens, c.in_flight, c.name))


def pick_tied(rng: random.Random, ordered: Sequence[Candidate], tied: int) -> list[Candidate]:
    """Move a seeded random one of the first `tied` (equally good) candidates to the front."""
    if tied <= 1:
        return list(ordered)
    i = rng.randrange(tied)
    return [ordered[i], *ordered[:i], *ordered[i + 1 :]]


def decide(
    policy: str,
    ranked: Sequence[Candidate],
    candidates: Sequence[Candidate],
    matches: Mapping[str, MatchResult],
    costs: Mapping[str, float] | None = None,
    queue_weight: float | None = None,
) -> Decision:
    """The decision for `ranked` (best first) with a score row per candidate; `costs` fills the
    cost column (a policy without one passes None), `queue_weight` the decision's."""
    scores = [
        score_row(c, matches.get(c.name), None if costs is None else costs.get(c.name))
        for c in candidates
    ]
    return Decision(
        engine=ranked[0].name,
        policy=policy,
        scores=scores,
        ranked=[c.name for c in ranked],
        queue_weight=queue_weight,
    )
