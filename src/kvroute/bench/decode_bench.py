"""Benchmark: decode rate (events/s) of vLLM KV-event payloads vs. untyped msgspec decoding.
Payloads: 4-block BlockStored events, map-encoded (0.33.0) and array-encoded (0.22.0)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from kvroute.bench.report import DEFAULT_OUT_DIR, print_table, save_json
from kvroute.events import (
    BatchDecoder,
    VllmBlockStored,
    VllmEventBatch,
    decode_batch,
)
from kvroute.events.publisher import encode_batch

__all__ = ["run"]

_BLOCK_SIZE = 16
_BLOCKS = 4
_SHAPES = (("map", "0.33.0"), ("array", "0.22.0"))
_EVENTS_PER_BATCH = (1, 32)
# seconds of timing per measurement, and repeats (best of)
_BUDGET = {"smoke": (0.02, 2), "full": (0.5, 5)}


def _payload(release: str, events: int) -> bytes:
    stored = []
    for e in range(events):
        base = 2**63 + e * 1_000
        tokens = list(range(e * 64, e * 64 + _BLOCK_SIZE * _BLOCKS))
        stored.append(
            VllmBlockStored(
                [base + b for b in range(_BLOCKS)],
                base - 1,
                tokens,
                _BLOCK_SIZE,
                None,
                "GPU",
                None,
                None,
                0,
            )
        )
    return encode_batch(VllmEventBatch(1700000000.5, list(stored), 0), release)


def _rate(decode: Callable[[bytes], Any], payload: bytes, budget_s: float, repeats: int) -> float:
    """Best batches/s over `repeats` runs of about `budget_s` each."""
    n = 1
    while True:  # calibrate the loop count to the budget
        start = time.perf_counter()
        for _ in range(n):
            decode(payload)
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s / 4 or n >= 1 << 24:
            break
        n *= 2
    best = n / elapsed
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            decode(payload)
        best = max(best, n / (time.perf_counter() - start))
    return best


def run(size: str = "smoke", out_dir: Path = DEFAULT_OUT_DIR) -> dict[str, Any]:
    """Measure, print a table, save bench-results/decode.json; return the results."""
    if size not in _BUDGET:
        raise ValueError(f"size: expected one of {sorted(_BUDGET)}, got {size!r}")
    budget_s, repeats = _BUDGET[size]
    baseline = msgspec.msgpack.Decoder().decode
    results: list[dict[str, Any]] = []
    for shape, release in _SHAPES:
        for events in _EVENTS_PER_BATCH:
            payload = _payload(release, events)
            if len(decode_batch(payload).events) != events:
                raise RuntimeError(f"decode bench: {shape} payload does not round-trip")
            base_rate = _rate(baseline, payload, budget_s, repeats) * events
            decoder = BatchDecoder()
            for name, decode in (("decode_batch", decode_batch), ("BatchDecoder", decoder.decode)):
                rate = _rate(decode, payload, budget_s, repeats) * events
                results.append(
                    {
                        "shape": shape,
                        "release": release,
                        "events_per_batch": events,
                        "payload_bytes": len(payload),
                        "decoder": name,
                        "events_per_s": rate,
                        "untyped_msgspec_events_per_s": base_rate,
                        "ratio_vs_untyped": rate / base_rate,
                    }
                )
    print_table(
        f"KV-event decode rate ({_BLOCKS}-block BlockStored events, size={size})",
        ["shape", "events/batch", "bytes", "decoder", "events/s", "untyped msgspec", "ratio"],
        [
            [
                r["shape"],
                r["events_per_batch"],
                r["payload_bytes"],
                r["decoder"],
                r["events_per_s"],
                r["untyped_msgspec_events_per_s"],
                r["ratio_vs_untyped"],
            ]
            for r in results
        ],
    )
    data: dict[str, Any] = {
        "size": size,
        "blocks_per_event": _BLOCKS,
        "block_size": _BLOCK_SIZE,
        "results": results,
    }
    data["path"] = str(save_json("decode", data, out_dir))
    return data
