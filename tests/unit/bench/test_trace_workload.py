"""Mooncake-format traces: the loader (malformed lines named by line number) and the token
synthesis (equal hash ids give equal blocks, whole engine blocks, scaled lengths and times)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kvroute.bench.trace_workload import (
    TRACE_BLOCK_TOKENS,
    TokenSynthesizer,
    TraceError,
    TraceRequest,
    TraceScaling,
    arrival_offsets,
    load_trace,
    prefix_reuse,
    trace_rate,
)


def _line(**overrides: Any) -> str:
    row: dict[str, Any] = {
        "timestamp": 0,
        "input_length": 1000,
        "output_length": 10,
        "hash_ids": [0, 1],
    }
    row.update(overrides)
    return json.dumps({k: v for k, v in row.items() if v is not ...})


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _request(hash_ids: list[int], input_length: int, output_length: int = 10) -> TraceRequest:
    return TraceRequest(0, 1, 0.0, input_length, output_length, tuple(hash_ids))


# --- the loader --------------------------------------------------------------------------------


def test_load_reads_every_field_in_file_order(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        [
            _line(timestamp=0, input_length=1000, output_length=5, hash_ids=[7, 8]),
            "",
            _line(timestamp=40.5, input_length=512, output_length=0, hash_ids=[7]),
        ],
    )
    first, second = load_trace(path)
    assert first == TraceRequest(0, 1, 0.0, 1000, 5, (7, 8))
    assert second == TraceRequest(1, 3, 40.5, 512, 0, (7,))  # the blank line is skipped


def test_load_stops_after_max_requests(tmp_path: Path) -> None:
    path = _write(tmp_path, [_line(timestamp=t) for t in range(10)] + ["not json"])
    requests = load_trace(path, max_requests=3)
    assert [r.timestamp_ms for r in requests] == [0.0, 1.0, 2.0]  # the bad line is never read


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        (_line(hash_ids=...), "missing field(s): hash_ids"),
        (_line(timestamp=-1), "timestamp: expected milliseconds >= 0"),
        (_line(timestamp="soon"), "timestamp: expected milliseconds >= 0"),
        (_line(input_length=0), "input_length: expected >= 1, got 0"),
        (_line(input_length=1.5), "input_length: expected an integer"),
        (_line(output_length=-2), "output_length: expected >= 0, got -2"),
        (_line(hash_ids=[]), "hash_ids: expected a non-empty list"),
        (_line(hash_ids=[1, "x"]), "hash_ids[1]: expected an integer >= 0"),
        (_line(hash_ids=[1, True]), "hash_ids[1]: expected an integer >= 0"),
        (_line(input_length=1025, hash_ids=[1, 2]), "exceeds its 2 hash ids"),
    ],
)
def test_a_malformed_line_is_named_by_file_and_line(
    tmp_path: Path, line: str, message: str
) -> None:
    path = _write(tmp_path, [_line(), _line(), line, _line()])
    with pytest.raises(TraceError) as info:
        load_trace(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert message in str(info.value)


def test_a_missing_or_empty_file_is_a_trace_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="No such file"):
        load_trace(tmp_path / "absent.jsonl")
    with pytest.raises(TraceError, match="no requests"):
        load_trace(_write(tmp_path, [""]))
    with pytest.raises(TraceError, match="max_requests: expected >= 1"):
        load_trace(_write(tmp_path, [_line()]), max_requests=0)


def test_the_shared_trace_loads() -> None:
    """The Mooncake trace beside the checkout (the Makefile's SHARED, ../shared) is readable."""
    shared = Path(
        os.environ.get("KVROUTE_SHARED") or Path(__file__).resolve().parents[4] / "shared"
    )
    path = shared / "traces/mooncake_synthetic_trace.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is not on this machine")
    requests = load_trace(path, max_requests=50)
    assert len(requests) == 50 and requests[0].input_length > 0


# --- token synthesis ---------------------------------------------------------------------------


def test_equal_hash_ids_give_equal_blocks_and_different_ids_different_ones() -> None:
    synth = TokenSynthesizer(TraceScaling(token_scale=1 / 16))
    a = synth.prompt(_request([5, 6, 7], 3 * 512))
    b = synth.prompt(_request([5, 6, 9], 3 * 512))
    per = synth.scaling.tokens_per_hash
    assert per == 32
    assert a[: 2 * per] == b[: 2 * per]  # the shared prefix, token for token
    assert a[2 * per :] != b[2 * per :]
    # a fresh synthesizer (another run, another process) makes the same tokens
    assert TokenSynthesizer(TraceScaling(token_scale=1 / 16)).block(5) == synth.block(5)
    blocks = {synth.block(h) for h in range(2000)}
    assert len(blocks) == 2000
    assert all(100 <= t < synth.scaling.vocab_size for block in blocks for t in block)


@pytest.mark.parametrize(
    ("scale", "block_size", "per_hash"),
    [
        (1 / 32, 16, 16),
        (1 / 16, 16, 32),
        (0.1, 16, 48),  # 51.2 tokens → 3 whole blocks
        (0.001, 16, 16),  # never less than one block
        (1.0, 16, 512),
        (1 / 32, 32, 32),
    ],
)
def test_tokens_per_hash_are_whole_engine_blocks(
    scale: float, block_size: int, per_hash: int
) -> None:
    scaling = TraceScaling(token_scale=scale, block_size=block_size)
    assert scaling.tokens_per_hash == per_hash
    assert scaling.tokens_per_hash % block_size == 0
    assert scaling.effective_scale == per_hash / TRACE_BLOCK_TOKENS
    assert len(TokenSynthesizer(scaling).block(3)) == per_hash


def test_lengths_are_scaled_and_kept_within_the_hash_blocks() -> None:
    synth = TokenSynthesizer(TraceScaling(token_scale=1 / 32))  # 16 tokens per hash id
    full = _request([1, 2, 3], 3 * 512, output_length=149)
    assert len(synth.prompt(full)) == synth.prompt_length(full) == 48
    assert synth.max_tokens(full) == 5  # 149 / 32, rounded
    partial = _request([1, 2, 3], 2 * 512 + 100, output_length=0)
    assert synth.prompt_length(partial) == 32 + 4  # ceil(100 / 32) tokens of the third block
    assert synth.prompt(partial) == synth.prompt(full)[:36]
    assert synth.max_tokens(partial) == 1  # never 0
    tiny = _request([4], 1)
    assert synth.prompt(tiny) == list(synth.block(4)[:1])


def test_scaling_rejects_bad_values() -> None:
    for scale in (0.0, -1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="token_scale"):
            TraceScaling(token_scale=scale)


def test_arrivals_are_scaled_by_the_time_factor() -> None:
    requests = [
        TraceRequest(i, i + 1, t, 512, 1, (i,)) for i, t in enumerate([1000.0, 1500.0, 3000.0])
    ]
    assert arrival_offsets(requests, 1.0) == [0.0, 0.5, 2.0]
    assert arrival_offsets(requests, 0.5) == [0.0, 0.25, 1.0]
    assert trace_rate(requests) == pytest.approx(1.0)  # 2 gaps over 2 s
    assert trace_rate(requests[:1]) is None
    burst = [TraceRequest(i, i + 1, 0.0, 512, 1, (i,)) for i in range(3)]
    assert trace_rate(burst) is None
    with pytest.raises(ValueError, match="time_factor"):
        arrival_offsets(requests, 0.0)


def test_prefix_reuse_counts_leading_blocks_seen_before() -> None:
    requests = [
        TraceRequest(0, 1, 0.0, 1024, 1, (1, 2)),
        TraceRequest(1, 2, 0.0, 1536, 1, (1, 2, 3)),  # 1024 of 1536 tokens seen
        TraceRequest(2, 3, 0.0, 1024, 1, (9, 2)),  # block 2 after another first block: new
        TraceRequest(3, 4, 0.0, 300, 1, (1,)),  # all 300 tokens seen
    ]
    assert prefix_reuse(requests) == pytest.approx((1024 + 300) / (1024 + 1536 + 1024 + 300))
    assert prefix_reuse(requests[:1]) == 0.0


def test_prefix_reuse_of_a_finite_lru_cache() -> None:
    requests = [
        TraceRequest(0, 1, 0.0, 1024, 1, (1, 2)),
        TraceRequest(1, 2, 0.0, 1024, 1, (5, 6)),
        TraceRequest(2, 3, 0.0, 1024, 1, (1, 2)),  # held by 4 blocks, evicted with 2
        TraceRequest(3, 4, 0.0, 1024, 1, (5, 6)),
    ]
    total = 4 * 1024
    assert prefix_reuse(requests, blocks=4) == pytest.approx(2048 / total)
    assert prefix_reuse(requests, blocks=2) == 0.0  # each prompt evicts the other
    assert prefix_reuse(requests, blocks=10**6) == prefix_reuse(requests)
    # a hit makes its blocks the most recently used: (1, 2) survives (7,) arriving after it
    touched = [*requests[:3], TraceRequest(4, 5, 0.0, 512, 1, (7,)), requests[2]]
    assert prefix_reuse(touched, blocks=3) == pytest.approx(1024 / (4 * 1024 + 512))
    with pytest.raises(ValueError, match="blocks"):
        prefix_reuse(requests, blocks=0)
