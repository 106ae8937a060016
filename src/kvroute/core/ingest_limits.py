"""The rates of the ingest budgets (events/budget.py): per source and for the whole process."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["IngestLimits"]


@dataclass(frozen=True, slots=True)
class IngestLimits:
    """Rates of the token buckets (0: unlimited) and how many seconds of each may be saved up.

    The field defaults limit nothing (a tracker made without a budget); the gateway's defaults
    are the settings' (`source_events_per_s` ..., README "Limits").
    """

    source_events_per_s: float = 0.0
    source_bytes_per_s: float = 0.0
    total_events_per_s: float = 0.0
    total_bytes_per_s: float = 0.0
    burst_s: float = 2.0
