"""`kvroute bench relay --size smoke` runs end to end: both paths deliver every message, and the
JSON holds the figures the README quotes (the relay in its own process, real sockets)."""

from __future__ import annotations

import json
from pathlib import Path

from kvroute.bench import relay_bench


def test_the_relay_bench_measures_both_paths_and_loses_nothing(tmp_path: Path) -> None:
    data = relay_bench.run("smoke", tmp_path)
    saved = json.loads((tmp_path / "relay.json").read_text())
    assert saved["latency_one_in_flight_us"]["relay"]["p99"] > 0
    burst = data["throughput_burst"]
    assert burst["direct"]["delivered"] == burst["relay"]["delivered"] == burst["messages"]
    paced = data["latency_paced_us"]
    assert paced["direct"]["delivered"] == paced["relay"]["delivered"] == paced["messages"]
    for key in ("latency p50, one in flight (µs)", "throughput, burst (msg/s)"):
        assert data["ratios_relay_over_direct"][key] > 0
