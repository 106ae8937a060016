"""A pure parser of an engine's Prometheus `/metrics` text into its `vllm:` gauges."""

from __future__ import annotations

import math
import re
from typing import Final

from kvroute.errors import EngineError

__all__ = [
    "KV_CACHE_USAGE",
    "KV_POOL_BLOCKS",
    "NUM_REQUESTS_RUNNING",
    "NUM_REQUESTS_WAITING",
    "parse_vllm_gauges",
    "scan_vllm_gauges",
]

NUM_REQUESTS_RUNNING = "vllm:num_requests_running"
NUM_REQUESTS_WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
_OLD_KV_CACHE_USAGE = "vllm:gpu_cache_usage_perc"  # before vLLM renamed it
KV_POOL_BLOCKS = "vllm:cache_config_info:num_gpu_blocks"
"""The engine's KV pool size in blocks: the `num_gpu_blocks` label of vLLM's info gauge
`vllm:cache_config_info` (value 1, the configuration in its labels), summed over its samples
(one per DP rank). Not a vLLM series name: the key under which the scrape reports the label."""
_CACHE_CONFIG_INFO = "vllm:cache_config_info"
_NUM_GPU_BLOCKS: Final = re.compile(r'(?:[{,]|[ \t])num_gpu_blocks[ \t]*=[ \t]*"([0-9]{1,18})"')
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
_NAME: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
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
        if not math.isnan(value):
            _add(gauges, name, value)
            if name == _CACHE_CONFIG_INFO:
                _add_pool_blocks(gauges, line)
    return _with_old_names(gauges)


def scan_vllm_gauges(text: str) -> dict[str, float]:
    """`parse_vllm_gauges` for the scrape loop: the same gauges from well-formed text, at an
    eighth of the cost on a real engine's page (~800 lines, mostly histogram buckets).

    Only comment lines and the samples that can be `vllm:` gauges go through the grammar; the
    rest (other prefixes, the samples of a family declared counter or histogram) are skipped
    by their leading characters. The first line must be a comment or a valid sample, so a body
    that is not Prometheus text (an HTML error page) still raises EngineError; a malformed line
    further down that `parse_vllm_gauges` would reject passes unnoticed if it holds no gauge.
    """
    types: dict[str, str] = {}
    gauges: dict[str, float] = {}
    skipped: tuple[str, ...] = ()  # how the samples of the last non-gauge family begin
    checked_first = False
    for raw in text.split("\n"):
        line = raw.strip(" \t\r")
        if not line:
            continue
        if line[0] == "#":
            checked_first = True
            if "TYPE" in line and (declared := _TYPE.fullmatch(line)) is not None:
                family, kind = declared["name"], declared["type"]
                types[family] = kind
                skipped = () if kind == "gauge" or kind in _UNTYPED else _family_heads(family)
            continue
        if not checked_first:
            checked_first = True
            if _SAMPLE.fullmatch(line) is None:
                raise _unparsable(line)
        if not line.startswith("vllm:") or line.startswith(skipped):
            continue
        head = _NAME.match(line)
        if head is None:  # cannot happen after startswith("vllm:"); keeps mypy and readers sure
            raise _unparsable(line)
        name = head.group()
        kind = types.get(name, "untyped")
        if name.endswith("_created") or (
            name.endswith(_NOT_GAUGE_SUFFIXES) if kind in _UNTYPED else kind != "gauge"
        ):
            continue
        m = _SAMPLE.fullmatch(line)
        if m is None or _FLOAT.fullmatch(m["value"]) is None:
            raise _unparsable(line)
        value = float(m["value"])
        if not math.isnan(value):
            _add(gauges, name, value)
            if name == _CACHE_CONFIG_INFO:
                _add_pool_blocks(gauges, line)
    return _with_old_names(gauges)


def _add_pool_blocks(gauges: dict[str, float], line: str) -> None:
    """`KV_POOL_BLOCKS` from one `vllm:cache_config_info` sample (a sample without the label,
    as vLLM's before it counted blocks, adds nothing)."""
    label = _NUM_GPU_BLOCKS.search(line)
    if label is not None:
        _add(gauges, KV_POOL_BLOCKS, float(label.group(1)))


def _family_heads(family: str) -> tuple[str, ...]:
    """How every sample line of a counter or histogram family `family` begins."""
    parts = ("", "_bucket", "_count", "_sum", "_total", "_created")
    return tuple(f"{family}{part}{sep}" for part in parts for sep in "{ \t")


def _add(gauges: dict[str, float], name: str, value: float) -> None:
    """One more sample of `name`: counts add up over DP ranks, fractions take the maximum."""
    if name not in gauges:
        gauges[name] = value
    elif name.endswith("_perc"):
        gauges[name] = max(gauges[name], value)
    else:
        gauges[name] += value


def _with_old_names(gauges: dict[str, float]) -> dict[str, float]:
    if KV_CACHE_USAGE not in gauges and _OLD_KV_CACHE_USAGE in gauges:
        gauges[KV_CACHE_USAGE] = gauges[_OLD_KV_CACHE_USAGE]
    return gauges
