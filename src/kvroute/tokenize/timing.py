"""Tokenization latency: `kvroute_tokenize_seconds{mode}` observed since a start time, when
metrics were given."""

from __future__ import annotations

import time

from kvroute.metrics import Metrics

__all__ = ["observe_since"]


def observe_since(metrics: Metrics | None, mode: str, started: float) -> None:
    """Observe `time.perf_counter() - started` under `mode` (cache, local, remote)."""
    if metrics is not None:
        metrics.tokenize_seconds.labels(mode=mode).observe(time.perf_counter() - started)
