"""Build a routing policy by its `PolicyName` (settings, the CLI and the demo name policies)."""

from __future__ import annotations

from kvroute.core import PolicyName
from kvroute.errors import ConfigError
from kvroute.routing.baseline import LeastLoadedPolicy, RandomPolicy, RoundRobinPolicy
from kvroute.routing.kv_aware import KvAwarePolicy
from kvroute.routing.types import CostWeights, Policy

__all__ = ["make_policy"]


def make_policy(name: PolicyName, *, seed: int = 0, weights: CostWeights | None = None) -> Policy:
    """A fresh policy; `seed` fixes tie-breaks and random choices, `weights` is for kv_aware.
    A plain string that names no policy raises ConfigError."""
    try:
        policy = PolicyName(name)
    except ValueError as exc:
        expected = ", ".join(PolicyName)
        raise ConfigError(f"policy: expected one of {expected}, got {name!r}") from exc
    match policy:
        case PolicyName.KV_AWARE:
            return KvAwarePolicy(seed=seed, weights=weights)
        case PolicyName.LEAST_LOADED:
            return LeastLoadedPolicy(seed=seed)
        case PolicyName.ROUND_ROBIN:
            return RoundRobinPolicy()
        case PolicyName.RANDOM:
            return RandomPolicy(seed=seed)
