"""Build a routing policy by its name (settings and the CLI name policies as strings)."""

from __future__ import annotations

from kvroute.errors import ConfigError
from kvroute.routing.baseline import LeastLoadedPolicy, RandomPolicy, RoundRobinPolicy
from kvroute.routing.kv_aware import KvAwarePolicy
from kvroute.routing.types import CostWeights, Policy

__all__ = ["POLICY_NAMES", "make_policy"]

POLICY_NAMES: tuple[str, ...] = ("kv_aware", "least_loaded", "round_robin", "random")


def make_policy(name: str, *, seed: int = 0, weights: CostWeights | None = None) -> Policy:
    """A fresh policy; `seed` fixes tie-breaks and random choices, `weights` is for kv_aware."""
    if name == "kv_aware":
        return KvAwarePolicy(seed=seed, weights=weights)
    if name == "least_loaded":
        return LeastLoadedPolicy(seed=seed)
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "random":
        return RandomPolicy(seed=seed)
    raise ConfigError(f"policy: expected one of {', '.join(POLICY_NAMES)}, got {name!r}")
