"""`RouteOutcome`: what one routing step decided for a request, and its `/v1/route` answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvroute.core import MatchResult
from kvroute.routing import Decision

__all__ = ["RouteOutcome"]


@dataclass(frozen=True)
class RouteOutcome:
    """One routing step: the base model and adapter, the prompt's ids (None when tokenization
    failed or was skipped), what each engine holds, and the policy's decision."""

    model: str
    lora: str | None
    token_ids: Sequence[int] | None
    prompt_tokens: int
    matches: dict[str, MatchResult]
    decision: Decision

    def route_json(self) -> dict[str, object]:
        """The `/v1/route` answer (docs/architecture.md, "/v1/route")."""
        return {
            "engine": self.decision.engine,
            "policy": self.decision.policy,
            "prompt_tokens": self.prompt_tokens,
            "queue_weight": self.decision.queue_weight,
            "engines": [
                {
                    "name": s.name,
                    "blocks_matched": s.blocks_matched,
                    "tokens_matched": s.tokens_matched,
                    "by_medium": dict(s.by_medium),
                    "speculative_blocks": s.speculative_blocks,
                    "outstanding_tokens": s.outstanding_tokens,
                    "queued_prefill_tokens": round(s.queued_prefill_tokens, 1),
                    "free_kv_tokens": s.free_kv_tokens,
                    "evicting": s.evicting,
                    "cost": s.cost,
                    "healthy": s.healthy,
                    "stale": s.stale,
                }
                for s in self.decision.scores
            ],
        }
