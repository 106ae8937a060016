"""What routing policies take and return: candidates, per-engine scores, decisions, cost weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvroute.core import MatchResult

__all__ = ["Candidate", "CostWeights", "Decision", "EngineScore", "Policy", "needs_tokens"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One engine the request may go to, as the fleet sees it right now."""

    name: str
    healthy: bool
    outstanding_tokens: int  # prompt + max output tokens of requests in flight to it
    in_flight: int
    # Prompt tokens routed there and predicted still waiting for prefill (routing/backlog.py).
    queued_prefill_tokens: float = 0.0
    # The engine's last fresh `vllm:kv_cache_usage_perc` (0..1); None: no fresh report.
    kv_usage: float | None = None
    # Tokens of KV pool the engine has not filled with cached blocks: its reported pool size
    # (`vllm:cache_config_info`) less the blocks the index holds there. What it prefills beyond
    # this evicts cached blocks (routing/kv_aware.py `evicted_tokens`); None: size unknown.
    free_kv_tokens: float | None = None
    # Whether the engine's pool evicted lately (its BlockRemoved events; routing/eviction.py).
    evicting: bool = False


@dataclass(frozen=True, slots=True)
class EngineScore:
    """How one candidate scored: what it holds of the prompt, its load, and its cost.

    `cost` is None for unhealthy candidates and for policies that do not compute one
    (round_robin, random); `stale` is filled by the gateway from `index.stale_engines()`.
    """

    name: str
    blocks_matched: int
    tokens_matched: int
    by_medium: dict[str, int]
    speculative_blocks: int
    outstanding_tokens: int
    cost: float | None
    healthy: bool
    stale: bool = False
    queued_prefill_tokens: float = 0.0  # the candidate's, as the cost saw it
    free_kv_tokens: float | None = None  # the candidate's, as the cost saw it
    evicting: bool = False  # the candidate's, as the cost saw it


@dataclass(frozen=True, slots=True)
class Decision:
    """The chosen engine, the policy that chose it, every candidate's score, and the fallback
    order (`ranked[0] == engine`, then the next-best healthy engines)."""

    engine: str
    policy: str
    scores: list[EngineScore]
    ranked: list[str]
    # kv_aware: the weight its cost gave queued prefill for this prompt (w_queue, lowered while
    # pools evict or the fleet is saturated); None for policies without one.
    queue_weight: float | None = None


def _default_medium_weights() -> dict[str, float]:
    return {"GPU": 1.0, "CPU": 0.8}


@dataclass(frozen=True, slots=True)
class CostWeights:
    """Weights of the kv_aware cost (docs/design.md §6): a predicted time to first token in
    prefill tokens, the engine's queued prefill plus this prompt's uncached part.

    `w_queue` 1.0 puts queued and own prefill in one unit, so a prefix and a queue trade
    continuously and a hot prefix spills to a second engine once the holder's queue costs more
    than prefilling it again there. `w_load` is only a tie-break between equal predictions now:
    at 0.1 outstanding (prompt + max output) tokens counted decode budgets the engine batches
    almost for free (docs/design.md §6; pinned by test_twenty_concurrent_requests_sharing_a_*).
    """

    w_prefill: float = 1.0
    w_load: float = 0.1
    medium: dict[str, float] = field(default_factory=_default_medium_weights)
    other_medium: float = 0.5  # any medium not named in `medium` (disk, remote store, ...)
    # > 0: only engines within this many outstanding tokens of the least loaded compete.
    imbalance_tokens: int = 0
    w_queue: float = 1.0  # weight of an engine's queued prefill tokens
    # Weight of the cached tokens a prefill there would evict (a full pool's copy of a prefix
    # pushes out another that later requests would have hit); 0 turns the term off.
    w_evict: float = 1.0
    # `w_queue` while every engine is evicting (blended by the evicting share in between): with
    # full pools, where a prefix lives decides later requests' hits (docs/design.md §6).
    w_queue_evicting: float = 0.1
    # > 0: a prompt also gets `w_queue_evicting` while even the least queued healthy engine has
    # this many times its tokens queued for prefill (the fleet is saturated: moving it off its
    # prefix buys no idle engine, only adds its prefill to the backlog; docs/design.md §6).
    saturated_queue_ratio: float = 0.5

    def medium_weight(self, medium: str) -> float:
        return self.medium.get(medium, self.other_medium)


class Policy(Protocol):
    """One synchronous interface for every routing policy (docs/architecture.md).

    `choose` never does I/O and never raises when, as the caller guarantees, at least one
    candidate is healthy (otherwise: ValueError). `matches` is keyed by engine name; an engine
    without an entry holds nothing of the prompt. A policy that reads neither `matches` nor an
    exact `prompt_tokens` says so with a class attribute `needs_tokens = False` (`needs_tokens`).
    """

    name: str

    def choose(
        self,
        candidates: Sequence[Candidate],
        matches: Mapping[str, MatchResult],
        prompt_tokens: int,
    ) -> Decision: ...


def needs_tokens(policy: Policy) -> bool:
    """Whether `policy` reads the prompt's tokens (prefix matches, exact count): the gateway
    tokenizes only then (gateway/service.py). A policy that does not say is taken to need them
    (kv_aware; routing/kv_aware.py); the load-only baselines say False (routing/baseline.py)."""
    return bool(getattr(policy, "needs_tokens", True))
