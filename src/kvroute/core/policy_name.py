"""The routing policies by name: one enum for settings, the CLI, the policy factory and the demo."""

from __future__ import annotations

import enum

__all__ = ["PolicyName"]


class PolicyName(enum.StrEnum):
    """A routing policy (routing/): its value is what settings, flags and metrics say."""

    KV_AWARE = "kv_aware"
    LEAST_LOADED = "least_loaded"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
