"""A pure parser of an engine's Prometheus `/metrics` text into its `vllm:` gauges."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from kvroute.errors import EngineError

__all__ = ["KV_CACHE_USAGE", "NUM_REQUESTS_RUNNING", "NUM_REQUESTS_WAITING", "parse_vllm_gauges"]

NUM_REQUESTS_RUNNING = "vllm:num_requests_running"
NUM_REQUESTS_WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
_OLD_KV_CACHE_USAGE = "vllm:gpu_cache_usage_perc"  # before vLLM renamed it (reference §10)
# Untyped samples with these endings are counter or histogram parts, not gauges.
_NOT_GAUGE_SUFFIXES = ("_total", "_count", "_sum", "_bucket", "_created")


def parse_vllm_gauges(text: str) -> dict[str, float]:
    """Every `vllm:` gauge of a scrape, one value per name.

    An engine with several DP ranks exposes one sample per rank (label `engine`): counts are
    summed, fractions (`*_perc`) take the maximum. The old `gpu_cache_usage_perc` is also
    reported as `kv_cache_usage_perc`. Counters and histograms are left out. A body that is
    not Prometheus text raises EngineError.
    """
    gauges: dict[str, float] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except (ValueError, TypeError, IndexError) as exc:
        raise EngineError(
            f"/metrics: expected Prometheus text, got an unparsable body: {exc}"
        ) from exc
    for family in families:
        if not family.name.startswith("vllm:"):
            continue
        if family.type != "gauge" and (
            family.type != "unknown" or family.name.endswith(_NOT_GAUGE_SUFFIXES)
        ):
            continue
        for sample in family.samples:
            if sample.name != family.name or math.isnan(sample.value):
                continue
            value = float(sample.value)
            if sample.name not in gauges:
                gauges[sample.name] = value
            elif sample.name.endswith("_perc"):
                gauges[sample.name] = max(gauges[sample.name], value)
            else:
                gauges[sample.name] += value
    if KV_CACHE_USAGE not in gauges and _OLD_KV_CACHE_USAGE in gauges:
        gauges[KV_CACHE_USAGE] = gauges[_OLD_KV_CACHE_USAGE]
    return gauges
