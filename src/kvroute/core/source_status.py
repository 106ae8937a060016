"""A snapshot of one engine source's subscription (`SourceStatus`): for /debug, metrics, tests."""

from __future__ import annotations

from dataclasses import dataclass

from kvroute.core.ids import SourceId

__all__ = ["SourceStatus"]


@dataclass(frozen=True)
class SourceStatus:
    """One source as its tracker sees it now. `stale_seconds` is the total time spent stale;
    `quiet_s` the time since its SUB socket last received anything, or since it connected (or
    was added) when nothing came after (gateway/silence.py judges it)."""

    source: SourceId
    engine: str
    rank: int
    endpoint: str
    connected: bool
    last_seq: int | None
    stale: bool
    stale_reason: str | None
    last_batch_age_s: float | None
    blocks: int
    stale_seconds: float = 0.0
    quiet_s: float = 0.0
