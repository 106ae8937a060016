"""The `kvroute events` subcommands (decode, listen)."""

from __future__ import annotations

from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    """Placeholder until the events commands land."""
    del sub
