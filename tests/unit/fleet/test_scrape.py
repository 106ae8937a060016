"""parse_vllm_gauges: the pure parser of an engine's /metrics, kept apart from the scrape loop."""

from __future__ import annotations

import pytest

from kvroute.errors import EngineError
from kvroute.fleet import (
    KV_CACHE_USAGE,
    KV_POOL_BLOCKS,
    NUM_REQUESTS_RUNNING,
    NUM_REQUESTS_WAITING,
    parse_vllm_gauges,
    scan_vllm_gauges,
)

# The shapes vLLM exposes: gauges per DP rank (label `engine`), a counter with
# `_total`, a histogram.
SCRAPE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 1234.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 3.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 5.0
vllm:time_to_first_token_seconds_count{model_name="m"} 5.0
vllm:time_to_first_token_seconds_sum{model_name="m"} 0.9
# HELP process_open_fds Number of open file descriptors.
# TYPE process_open_fds gauge
process_open_fds 12.0
"""


def test_gauges_are_summed_over_ranks_and_fractions_take_the_max() -> None:
    assert parse_vllm_gauges(SCRAPE) == {
        NUM_REQUESTS_RUNNING: 5.0,
        NUM_REQUESTS_WAITING: 4.0,
        KV_CACHE_USAGE: 0.75,
    }


# vLLM's info gauge: the cache configuration in labels, one sample per DP rank, value 1.
CACHE_CONFIG = """\
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",num_gpu_blocks="1024"} 1.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="1",num_gpu_blocks="2048"} 1.0
"""


def test_the_pool_size_is_read_from_cache_config_info_labels_and_summed_over_ranks() -> None:
    gauges = parse_vllm_gauges(SCRAPE + CACHE_CONFIG)
    assert gauges[KV_POOL_BLOCKS] == 3072.0
    assert scan_vllm_gauges(SCRAPE + CACHE_CONFIG) == gauges


@pytest.mark.parametrize(
    "labels",
    [
        'block_size="16"',  # an engine that does not say
        'num_gpu_blocks="None"',  # vLLM before the pool is sized
        'x_num_gpu_blocks="5"',  # another label ending like it
        'num_gpu_blocks="-5"',
        'num_gpu_blocks="1e9"',
    ],
)
def test_a_cache_config_info_without_a_plain_block_count_gives_no_pool_size(labels: str) -> None:
    text = f"# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{{{labels}}} 1.0\n"
    assert KV_POOL_BLOCKS not in parse_vllm_gauges(text)
    assert KV_POOL_BLOCKS not in scan_vllm_gauges(text)


def test_old_gpu_cache_usage_name_is_also_reported_under_the_new_one() -> None:
    text = '# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{model_name="m"} 0.5\n'
    assert parse_vllm_gauges(text) == {"vllm:gpu_cache_usage_perc": 0.5, KV_CACHE_USAGE: 0.5}


def test_untyped_samples_count_unless_they_look_like_counter_or_histogram_parts() -> None:
    text = "vllm:num_requests_running 1\nvllm:prefix_cache_queries_total 9\nvllm:x_count 3\n"
    assert parse_vllm_gauges(text) == {NUM_REQUESTS_RUNNING: 1.0}


def test_nan_samples_are_skipped_and_empty_bodies_give_nothing() -> None:
    assert parse_vllm_gauges("# TYPE vllm:a gauge\nvllm:a NaN\n") == {}
    assert parse_vllm_gauges("") == {}


@pytest.mark.parametrize("body", ["garbage { {", "vllm:a{engine=0} 1\n", "<html>502</html>"])
def test_unparsable_body_is_an_engine_error(body: str) -> None:
    with pytest.raises(EngineError, match="/metrics: expected Prometheus text"):
        parse_vllm_gauges(body)


def test_label_values_with_escapes_timestamps_and_empty_label_sets_parse() -> None:
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="a \\"quoted\\" {name}, \\\\ x",engine="0",} 1 '
        "1700000000000\n"
        "vllm:num_requests_running{} 2\n"
        "vllm:num_requests_running\t3\r\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        "vllm:kv_cache_usage_perc +Inf\n"
    )
    assert parse_vllm_gauges(text) == {NUM_REQUESTS_RUNNING: 6.0, KV_CACHE_USAGE: float("inf")}


def test_a_name_declared_as_counter_or_histogram_is_never_a_gauge() -> None:
    text = (
        "# TYPE vllm:num_preemptions counter\n"
        "vllm:num_preemptions 4\n"
        "# TYPE vllm:e2e_latency histogram\n"
        "vllm:e2e_latency 1\n"
        "# TYPE vllm:odd untyped\n"
        "vllm:odd 2\n"
        "vllm:odd_total 9\n"
    )
    assert parse_vllm_gauges(text) == {"vllm:odd": 2.0}


@pytest.mark.parametrize(
    "line",
    [
        "vllm:a 1_000",  # Python float() syntax, not Prometheus
        'vllm:a{engine="0} 1',  # unterminated label value
        'vllm:a{0engine="0"} 1',  # label names do not start with a digit
        "vllm:a 1 2.5",  # timestamps are integers
    ],
)
def test_lines_outside_the_text_format_are_engine_errors(line: str) -> None:
    with pytest.raises(EngineError, match="unparsable line"):
        parse_vllm_gauges(f"# TYPE vllm:a gauge\n{line}\n")


def test_creation_times_declared_as_gauges_are_not_gauges() -> None:
    # prometheus_client (which vLLM uses) exports a counter's creation time as a gauge named
    # `<name>_created` in text format 0.0.4; seen on a real engine in `make test-vllm`.
    body = (
        "# TYPE vllm:prompt_tokens_created gauge\n"
        "vllm:prompt_tokens_created 1.7961e09\n"
        "# TYPE vllm:num_requests_running gauge\n"
        "vllm:num_requests_running 2\n"
    )
    assert parse_vllm_gauges(body) == {"vllm:num_requests_running": 2.0}


# ---- scan_vllm_gauges: the scrape loop's cheaper reading of the same text ----------------------

_WELL_FORMED = [
    SCRAPE,
    SCRAPE + CACHE_CONFIG,
    '# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{model_name="m"} 0.5\n',
    "vllm:num_requests_running 1\nvllm:prefix_cache_queries_total 9\nvllm:x_count 3\n",
    "# TYPE vllm:a gauge\nvllm:a NaN\n",
    "",
    "# TYPE vllm:num_preemptions counter\nvllm:num_preemptions 4\n"
    "# TYPE vllm:e2e_latency histogram\nvllm:e2e_latency 1\n"
    "# TYPE vllm:odd untyped\nvllm:odd 2\nvllm:odd_total 9\n",
    "# TYPE vllm:prompt_tokens_created gauge\nvllm:prompt_tokens_created 1.7961e09\n"
    "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 2\n",
    # A histogram family followed by an undeclared gauge whose name extends the family's.
    '# TYPE vllm:lat histogram\nvllm:lat_bucket{le="1"} 2\nvllm:lat_count 2\nvllm:lat_sum 1\n'
    "vllm:lat_p50 0.5\nvllm:latency 3\n",
    # A gauge declared with a counter-like ending counts as a gauge.
    "# TYPE vllm:x_total gauge\nvllm:x_total 7\n",
    'vllm:num_requests_running{model_name="a \\"quoted\\" {name}, \\\\ x",engine="0",} 1 17\n'
    "vllm:num_requests_running{} 2\nvllm:num_requests_running\t3\r\n",
]


@pytest.mark.parametrize("text", _WELL_FORMED)
def test_scan_reads_the_same_gauges_as_the_full_parser(text: str) -> None:
    assert scan_vllm_gauges(text) == parse_vllm_gauges(text)


@pytest.mark.parametrize("body", ["<html>502</html>", "garbage { {", "vllm:a{engine=0} 1\n"])
def test_scan_rejects_a_body_that_is_not_prometheus_text(body: str) -> None:
    with pytest.raises(EngineError, match="/metrics: expected Prometheus text"):
        scan_vllm_gauges(body)


def test_scan_checks_every_line_that_can_hold_a_vllm_gauge() -> None:
    with pytest.raises(EngineError, match="unparsable line"):
        scan_vllm_gauges('# TYPE vllm:a gauge\nvllm:a 1\nvllm:b{x="1} 2\n')
    # A broken histogram bucket further down holds no gauge: skipped unread (documented).
    text = '# TYPE vllm:h histogram\nvllm:h_bucket{le="1} 2\nvllm:num_requests_running 1\n'
    assert scan_vllm_gauges(text) == {NUM_REQUESTS_RUNNING: 1.0}
