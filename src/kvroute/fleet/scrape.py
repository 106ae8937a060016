"""A pure parser of an engine's Prometheus `/metrics` text into its `vllm:` gauges."""

from __future__ import annotations

import math
import re
from typing import Final

from kvroute.errors import EngineError

__all__ = ["KV_CACHE_USAGE", "NUM_REQUESTS_RUNNING", "NUM_REQUESTS_WAITING", "parse_vllm_gauges"]

NUM_REQUESTS_RUNNING = "vllm:num_requests_running"
NUM_REQUESTS_WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
_OLD_KV_CACHE_USAGE = "vllm:gpu_cache_usage_perc"  # before vLLM renamed it
# (pinned by test_old_gpu_cache_usage_name_is_also_reported_under_the_new_one)
# Untyped samples with these endings are counter or histogram parts, not gauges.
_NOT_GAUGE_SUFFIXES = ("_total", "_count", "_sum", "_bucket", "_created")
_UNTYPED: Final = frozenset({"untyped", "unknown"})

# The text exposition format, one sample per line: name, optional {label="value",...} (values
# escape \\, \" and \n), the value, an optional integer timestamp.
_LABEL: Final = r'[a-zA-Z_][a-zA-Z0-9_]*[ \t]*=[ \t]*"(?:[^"\\\n]|\\.)*"'
_SAMPLE: Final = re.compile(
    r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)[ \t]*"
    rf"(?:\{{[ \t]*(?:{_LABEL}[ \t]*(?:,[ \t]*{_LABEL}[ \t]*)*,?[ \t]*)?\}})?"
    r"[ \t]*(?P<value>[^ \t]+)(?:[ \t]+-?[0-9]+)?[ \t]*"
)
_TYPE: Final = re.compile(r"#[ \t]+TYPE[ \t]+(?P<name>[^ \t]+)[ \t]+(?P<type>[a-z]+)[ \t]*")
_FLOAT: Final = re.compile(
    r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|(?i:inf|nan))"
)


def _unparsable(line: str) -> EngineError:
    return EngineError(f"/metrics: expected Prometheus text, got an unparsable line {line[:80]!r}")


def parse_vllm_gauges(text: str) -> dict[str, float]:
    """Every `vllm:` gauge of a scrape, one value per name.

    An engine with several DP ranks exposes one sample per rank (label `engine`): counts are
    summed, fractions (`*_perc`) take the maximum. The old `gpu_cache_usage_perc` is also
    reported as `kv_cache_usage_perc`. A sample counts when its own name is declared a gauge,
    or is untyped (undeclared) without a counter or histogram ending; `*_created` samples (the
    creation times prometheus_client exports as gauges) and NaN samples are skipped.
    A body that is not Prometheus text raises EngineError.
    """
    types: dict[str, str] = {}  # name -> type, as declared so far (TYPE precedes its samples)
    gauges: dict[str, float] = {}
    for raw in text.split("\n"):
        line = raw.strip(" \t\r")
        if not line:
            continue
        if line[0] == "#":
            declared = _TYPE.fullmatch(line)
            if declared is not None:
                types[declared["name"]] = declared["type"]
            continue  # HELP and other comments
        m = _SAMPLE.fullmatch(line)
        if m is None or _FLOAT.fullmatch(m["value"]) is None:
            raise _unparsable(line)
        name = m["name"]
        if not name.startswith("vllm:") or name.endswith("_created"):
            continue  # `_created`: a counter's creation time, declared a gauge by some clients
        value = float(m["value"])
        kind = types.get(name, "untyped")
        if kind in _UNTYPED:
            if name.endswith(_NOT_GAUGE_SUFFIXES):
                continue
        elif kind != "gauge":
            continue
        if math.isnan(value):
            continue
        if name not in gauges:
            gauges[name] = value
        elif name.endswith("_perc"):
            gauges[name] = max(gauges[name], value)
        else:
            gauges[name] += value
    if KV_CACHE_USAGE not in gauges and _OLD_KV_CACHE_USAGE in gauges:
        gauges[KV_CACHE_USAGE] = gauges[_OLD_KV_CACHE_USAGE]
    return gauges
