"""Tokenization latency: report the seconds since a start time to an optional `observe(mode,
seconds)` callback (the gateway wires `Metrics.observe_tokenize`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeAlias

__all__ = ["Observe", "observe_since"]

Observe: TypeAlias = Callable[[str, float], None]
"""Called with (mode, seconds) per tokenization: mode `cache`, `local` or `remote`."""


def observe_since(observe: Observe | None, mode: str, started: float) -> None:
    """Report `time.perf_counter() - started` under `mode`, when someone listens."""
    if observe is not None:
        observe(mode, time.perf_counter() - started)
