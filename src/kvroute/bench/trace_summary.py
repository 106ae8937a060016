"""One policy's run of a trace (`kvroute bench trace`) summarised: hit rate, TTFT and e2e
quantiles, SLO attainment, load spread."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RunSummary",
    "TraceRecord",
    "median_run",
    "percentile",
    "round_finite",
    "round_opt",
    "summarise",
]


@dataclass(frozen=True)
class TraceRecord:
    """One request as the gateway answered it; times are the simulator's (ms)."""

    index: int
    engine: str
    status: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    e2e_ms: float | None
    sent_s: float = 0.0  # simulated seconds from the run's start when it was sent
    late_ms: float = 0.0  # how much later than its (scaled) arrival time, simulated ms
    error: str | None = None  # what a failed request got back
    # Wall ms the client waited beyond the engine's own end-to-end time (sim ms / speed): what
    # the router (parsing, tokenizing, routing, proxying) and the host's scheduling added.
    added_ms: float | None = None


@dataclass(frozen=True)
class RunSummary:
    """One policy's run of the trace at one time factor."""

    policy: str
    time_factor: float
    requests: int  # answered
    errors: int
    hit_rate: float
    ttft_ms: dict[str, float]  # p50, p90, p99 of the answered requests
    e2e_ms: dict[str, float]
    throughput_rps: float  # answered requests per simulated second
    arrival_rps: float | None  # the arrival rate the run achieved (None: one burst)
    late_ms: dict[str, float]  # p50, p90, p99 of how late requests were sent (a slow host)
    slo_attainment: float  # share of all requests whose TTFT met the SLO
    ttft_p90_all_ms: float  # p90 with each error counted as an infinite TTFT
    per_engine: dict[str, int]
    load_max_over_mean: float
    sim_seconds: float
    ttfts: list[float]  # sorted, for the CDF
    error_samples: list[str] = field(default_factory=list)  # a few distinct failures
    added_ms: dict[str, float] = field(default_factory=dict)  # p50, p90, p99 (wall ms)

    def passes(self, slo_ms: float) -> bool:
        return self.ttft_p90_all_ms <= slo_ms

    def summary(self) -> dict[str, Any]:
        return {
            "hit_rate": round(self.hit_rate, 4),
            "ttft_ms": {k: round_finite(v) for k, v in self.ttft_ms.items()},
            "e2e_ms": {k: round_finite(v) for k, v in self.e2e_ms.items()},
            "throughput_rps": round(self.throughput_rps, 3),
            "arrival_rps": round_opt(self.arrival_rps, 3),
            "sent_late_ms": {k: round_finite(v) for k, v in self.late_ms.items()},
            "added_latency_wall_ms": {k: round_finite(v) for k, v in self.added_ms.items()},
            "slo_attainment": round(self.slo_attainment, 4),
            "load_max_over_mean": round_finite(self.load_max_over_mean, 3),
            "requests_per_engine": self.per_engine,
            "requests": self.requests,
            "errors": self.errors,
            "error_samples": self.error_samples,
            "sim_seconds": round(self.sim_seconds, 2),
        }


def round_finite(value: float, digits: int = 2) -> float | None:
    return round(value, digits) if math.isfinite(value) else None


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[k]


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    return {f"p{round(q * 100)}": percentile(values, q) for q in (0.5, 0.9, 0.99)}


def summarise(
    policy: str,
    time_factor: float,
    records: Sequence[TraceRecord],
    sim_seconds: float,
    engines: int,
    slo_ms: float,
) -> RunSummary:
    """Hit rate (cached over prompt tokens), latency quantiles and load of one run's records."""
    ok = [r for r in records if r.status == 200]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    ttfts = sorted(r.ttft_ms for r in ok if r.ttft_ms is not None)
    e2es = [r.e2e_ms for r in ok if r.e2e_ms is not None]
    counted = ttfts + [math.inf] * (len(records) - len(ttfts))
    per_engine = Counter(r.engine for r in ok)
    for e in range(engines):
        per_engine.setdefault(f"engine-{e}", 0)
    counts = list(per_engine.values())
    mean = statistics.fmean(counts) if counts else 0.0
    sent = [r.sent_s for r in records]
    span = max(sent) - min(sent) if sent else 0.0
    return RunSummary(
        policy=policy,
        time_factor=time_factor,
        requests=len(ok),
        errors=len(records) - len(ok),
        hit_rate=cached / prompt if prompt else 0.0,
        ttft_ms=_quantiles(ttfts),
        e2e_ms=_quantiles(e2es),
        throughput_rps=len(ok) / sim_seconds if sim_seconds > 0 else 0.0,
        arrival_rps=(len(records) - 1) / span if span > 0 else None,
        late_ms=_quantiles([r.late_ms for r in records]),
        slo_attainment=sum(t <= slo_ms for t in ttfts) / len(records) if records else 0.0,
        ttft_p90_all_ms=percentile(counted, 0.9) if counted else math.inf,
        per_engine=dict(sorted(per_engine.items())),
        load_max_over_mean=max(counts) / mean if mean else math.nan,
        sim_seconds=sim_seconds,
        ttfts=ttfts,
        error_samples=list(dict.fromkeys(r.error or "?" for r in records if r.status != 200))[:3],
        added_ms=_quantiles([r.added_ms for r in ok if r.added_ms is not None]),
    )


def round_opt(value: float | None, digits: int) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def median_run(runs: Sequence[RunSummary]) -> RunSummary:
    """The run of median TTFT p90 (errors counted as infinite) among repeats at one rate; for
    an even count the worse of the two middle ones, so a step passes only when more than half
    of its runs met the SLO."""
    if not runs:
        raise ValueError("runs: expected at least one")
    return sorted(runs, key=lambda r: r.ttft_p90_all_ms)[len(runs) // 2]
