"""Routing: score engines from prefix matches and load, and pick one, behind one sync interface."""

from kvroute.routing.baseline import LeastLoadedPolicy, RandomPolicy, RoundRobinPolicy
from kvroute.routing.eviction import DEFAULT_EVICTING_WINDOW_S, EvictionRecency
from kvroute.routing.factory import make_policy
from kvroute.routing.kv_aware import (
    GUARD_POLICY_NAME,
    KvAwarePolicy,
    evicted_tokens,
    kv_cost,
    uncached_prefill,
)
from kvroute.routing.types import (
    Candidate,
    CostWeights,
    Decision,
    EngineScore,
    Policy,
    needs_tokens,
)

__all__ = [
    "DEFAULT_EVICTING_WINDOW_S",
    "GUARD_POLICY_NAME",
    "Candidate",
    "CostWeights",
    "Decision",
    "EngineScore",
    "EvictionRecency",
    "KvAwarePolicy",
    "LeastLoadedPolicy",
    "Policy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "evicted_tokens",
    "kv_cost",
    "make_policy",
    "needs_tokens",
    "uncached_prefill",
]
