"""The load-only baselines kv_aware is measured against: least_loaded, round_robin, random."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from kvroute.core import MatchResult, PolicyName
from kvroute.routing.scores import decide, healthy_candidates, least_loaded_order, pick_tied
from kvroute.routing.types import Candidate, Decision

__all__ = ["LeastLoadedPolicy", "RandomPolicy", "RoundRobinPolicy", "least_loaded_decision"]


def least_loaded_decision(
    policy: str,
    rng: random.Random,
    candidates: Sequence[Candidate],
    matches: Mapping[str, MatchResult],
) -> Decision:
    """Least outstanding tokens, then fewest in flight; exact ties broken by `rng`."""
    ordered = least_loaded_order(healthy_candidates(candidates))
    best = (ordered[0].outstanding_tokens, ordered[0].in_flight)
    tied = sum(1 for c in ordered if (c.outstanding_tokens, c.in_flight) == best)
    costs = {c.name: float(c.outstanding_tokens) for c in candidates}
    return decide(policy, pick_tied(rng, ordered, tied), candidates, matches, costs)


class LeastLoadedPolicy:
    """Fewest outstanding tokens (prompt + max output of requests in flight), then fewest
    requests in flight. Its cost column is the outstanding token count."""

    name: str = PolicyName.LEAST_LOADED
    needs_tokens: bool = False  # by load or turn alone: no tokenization (types.needs_tokens)

    def __init__(self, *, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(
        self,
        candidates: Sequence[Candidate],
        matches: Mapping[str, MatchResult],
        prompt_tokens: int,
    ) -> Decision:
        return least_loaded_decision(self.name, self._rng, candidates, matches)


class RoundRobinPolicy:
    """Healthy engines in name order, one after another; no cost column."""

    name: str = PolicyName.ROUND_ROBIN
    needs_tokens: bool = False

    def __init__(self) -> None:
        self._turn = 0

    def choose(
        self,
        candidates: Sequence[Candidate],
        matches: Mapping[str, MatchResult],
        prompt_tokens: int,
    ) -> Decision:
        healthy = sorted(healthy_candidates(candidates), key=lambda c: c.name)
        start = self._turn % len(healthy)
        self._turn += 1
        return decide(self.name, healthy[start:] + healthy[:start], candidates, matches)


class RandomPolicy:
    """A seeded uniform choice among healthy engines; the fallback order is a seeded shuffle."""

    name: str = PolicyName.RANDOM
    needs_tokens: bool = False

    def __init__(self, *, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(
        self,
        candidates: Sequence[Candidate],
        matches: Mapping[str, MatchResult],
        prompt_tokens: int,
    ) -> Decision:
        ranked = sorted(healthy_candidates(candidates), key=lambda c: c.name)
        self._rng.shuffle(ranked)
        return decide(self.name, ranked, candidates, matches)
