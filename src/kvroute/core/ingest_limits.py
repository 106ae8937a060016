"""What one source may make kvroute do: the rates of the ingest budgets (events/budget.py), per
source and for the whole process, and the size of one decoded batch."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["IngestLimits"]


@dataclass(frozen=True, slots=True)
class IngestLimits:
    """Rates of the token buckets (0: unlimited), how many seconds of each may be saved up,
    and the most events and blocks one batch may carry (0: no limit).

    The field defaults limit nothing (a tracker made without a budget); the gateway's defaults
    are the settings' (`source_events_per_s` ..., README "Limits").
    """

    source_events_per_s: float = 0.0
    source_bytes_per_s: float = 0.0
    total_events_per_s: float = 0.0
    total_bytes_per_s: float = 0.0
    burst_s: float = 2.0
    max_batch_events: int = 0
    max_batch_blocks: int = 0
