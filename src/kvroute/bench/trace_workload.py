"""Mooncake-format request traces read line by line, and their requests made into token-id prompts
(deterministic tokens per hash id), with lengths and arrival times scaled for a CPU run."""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "TRACE_BLOCK_TOKENS",
    "TokenSynthesizer",
    "TraceError",
    "TraceRequest",
    "TraceScaling",
    "arrival_offsets",
    "load_trace",
    "parse_trace_line",
    "prefix_reuse",
    "trace_rate",
]

TRACE_BLOCK_TOKENS = 512
"""Tokens behind one hash id of a Mooncake trace."""

_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")
_FIRST_TOKEN_ID = 100  # the simulator reserves ids below this for special tokens
_CACHED_BLOCKS = 1 << 16  # hash ids whose tokens are kept (a bound on memory, not on results)


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the file and line."""


@dataclass(frozen=True)
class TraceRequest:
    """One line of a trace: arrival (ms from the trace's start), prompt and output lengths, and
    one hash id per 512-token block of the prompt (equal ids: the same block)."""

    index: int  # position among the trace's requests (file order)
    line: int  # 1-based line number in the file
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def _int_field(obj: dict[str, Any], name: str, minimum: int) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an integer, got {_shown(value)}")
    if value < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {value}")
    return value


def _shown(value: object) -> str:
    if value is None:
        return "nothing"
    text = json.dumps(value) if isinstance(value, str | int | float | list | dict) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_trace_line(text: str, index: int, line: int) -> TraceRequest:
    """One trace line as a request; ValueError (without the location) when it is malformed."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {_shown(obj)}")
    missing = [k for k in _FIELDS if k not in obj]
    if missing:
        raise ValueError(f"missing field(s): {', '.join(missing)}")
    timestamp = obj["timestamp"]
    if (
        isinstance(timestamp, bool)
        or not isinstance(timestamp, int | float)
        or not math.isfinite(timestamp)
        or timestamp < 0
    ):
        raise ValueError(f"timestamp: expected milliseconds >= 0, got {_shown(timestamp)}")
    input_length = _int_field(obj, "input_length", 1)
    output_length = _int_field(obj, "output_length", 0)
    hash_ids = obj["hash_ids"]
    if not isinstance(hash_ids, list) or not hash_ids:
        raise ValueError(f"hash_ids: expected a non-empty list of integers, got {_shown(hash_ids)}")
    for i, h in enumerate(hash_ids):
        if isinstance(h, bool) or not isinstance(h, int) or h < 0:
            raise ValueError(f"hash_ids[{i}]: expected an integer >= 0, got {_shown(h)}")
    if input_length > len(hash_ids) * TRACE_BLOCK_TOKENS:
        raise ValueError(
            f"input_length {input_length} exceeds its {len(hash_ids)} hash ids × "
            f"{TRACE_BLOCK_TOKENS} tokens"
        )
    return TraceRequest(
        index=index,
        line=line,
        timestamp_ms=float(timestamp),
        input_length=input_length,
        output_length=output_length,
        hash_ids=tuple(hash_ids),
    )


def load_trace(path: Path, max_requests: int | None = None) -> list[TraceRequest]:
    """The first `max_requests` requests of a JSONL trace (None: all); blank lines are skipped.
    TraceError names the file and line of the first malformed request."""
    if max_requests is not None and max_requests < 1:
        raise TraceError(f"max_requests: expected >= 1, got {max_requests}")
    requests: list[TraceRequest] = []
    try:
        with Path(path).open(encoding="utf-8") as f:
            for line_no, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    requests.append(parse_trace_line(text, len(requests), line_no))
                except ValueError as exc:
                    raise TraceError(f"{path}:{line_no}: {exc}") from None
                if max_requests is not None and len(requests) >= max_requests:
                    break
    except OSError as exc:
        raise TraceError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if not requests:
        raise TraceError(f"{path}: no requests")
    return requests


@dataclass(frozen=True)
class TraceScaling:
    """How trace tokens become simulator tokens: each hash id's 512 tokens become
    `tokens_per_hash` = 512 × `token_scale` rounded to whole engine blocks (at least one)."""

    token_scale: float = 1 / 32
    block_size: int = 16
    vocab_size: int = 32_000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.token_scale) and 0 < self.token_scale <= 1):
            raise ValueError(f"token_scale: expected 0 < scale <= 1, got {self.token_scale}")
        if self.block_size < 1:
            raise ValueError(f"block_size: expected >= 1, got {self.block_size}")
        if self.vocab_size <= _FIRST_TOKEN_ID + 1:
            raise ValueError(f"vocab_size: expected > {_FIRST_TOKEN_ID + 1}, got {self.vocab_size}")

    @property
    def tokens_per_hash(self) -> int:
        blocks = max(1, round(TRACE_BLOCK_TOKENS * self.token_scale / self.block_size))
        return blocks * self.block_size

    @property
    def effective_scale(self) -> float:
        """The scale actually applied (token_scale after rounding to whole blocks)."""
        return self.tokens_per_hash / TRACE_BLOCK_TOKENS


class TokenSynthesizer:
    """Token-id prompts for trace requests: hash id h is always the same `tokens_per_hash`
    tokens (seeded by h), so equal ids give equal blocks and the engines' caches see the reuse."""

    def __init__(self, scaling: TraceScaling | None = None) -> None:
        self.scaling = scaling or TraceScaling()
        self._blocks: dict[int, tuple[int, ...]] = {}

    def block(self, hash_id: int) -> tuple[int, ...]:
        """The tokens of one hash id."""
        tokens = self._blocks.get(hash_id)
        if tokens is None:
            if len(self._blocks) >= _CACHED_BLOCKS:
                self._blocks.clear()
            s = self.scaling
            tokens = self._blocks[hash_id] = _block_tokens(hash_id, s.tokens_per_hash, s.vocab_size)
        return tokens

    def prompt_length(self, request: TraceRequest) -> int:
        """The scaled input length, within the request's hash blocks (at least one token)."""
        covered = len(request.hash_ids) * self.scaling.tokens_per_hash
        scaled = math.ceil(request.input_length * self.scaling.effective_scale)
        return max(1, min(covered, scaled))

    def max_tokens(self, request: TraceRequest) -> int:
        """The scaled output length (at least one token)."""
        return max(1, round(request.output_length * self.scaling.effective_scale))

    def prompt(self, request: TraceRequest) -> list[int]:
        """The blocks of the request's hash ids in order, cut to its scaled input length."""
        n = self.prompt_length(request)
        per = self.scaling.tokens_per_hash
        ids: list[int] = []
        for h in request.hash_ids[: -(-n // per)]:
            ids.extend(self.block(h))
        del ids[n:]
        return ids


def _block_tokens(hash_id: int, n: int, vocab_size: int) -> tuple[int, ...]:
    span = vocab_size - _FIRST_TOKEN_ID
    out: list[int] = []
    counter = 0
    while len(out) < n:
        digest = hashlib.blake2b(f"{hash_id}:{counter}".encode(), digest_size=64).digest()
        counter += 1
        for j in range(0, 64, 4):
            if len(out) == n:
                break
            out.append(_FIRST_TOKEN_ID + int.from_bytes(digest[j : j + 4], "big") % span)
    return tuple(out)


def arrival_offsets(requests: Sequence[TraceRequest], time_factor: float) -> list[float]:
    """Each request's arrival in seconds after the trace's first, times `time_factor` (< 1:
    arrivals closer together, a higher rate; > 1: further apart)."""
    if not (math.isfinite(time_factor) and time_factor > 0):
        raise ValueError(f"time_factor: expected > 0, got {time_factor}")
    if not requests:
        return []
    t0 = min(r.timestamp_ms for r in requests)
    return [(r.timestamp_ms - t0) / 1000.0 * time_factor for r in requests]


def trace_rate(requests: Sequence[TraceRequest]) -> float | None:
    """The trace's own arrival rate in requests per second (None: all arrive at one instant)."""
    if len(requests) < 2:
        return None
    times = [r.timestamp_ms for r in requests]
    span_s = (max(times) - min(times)) / 1000.0
    return (len(requests) - 1) / span_s if span_s > 0 else None


def prefix_reuse(requests: Sequence[TraceRequest], blocks: int | None = None) -> float:
    """The share of the requests' prompt tokens in leading blocks an earlier request already
    sent: the hit rate of one unbounded cache that holds every earlier prompt at once, or with
    `blocks`, of one least-recently-used cache of that many trace blocks (the fleet's whole KV
    as a single pool: a reference for finite pools, not a bound, since LRU is not optimal)."""
    if blocks is not None and blocks < 1:
        raise ValueError(f"blocks: expected >= 1 or None, got {blocks}")
    cache: OrderedDict[tuple[int, ...], None] = OrderedDict()
    reused = total = 0
    for r in requests:
        k = 0
        while k < len(r.hash_ids) and r.hash_ids[: k + 1] in cache:
            k += 1
        reused += min(k * TRACE_BLOCK_TOKENS, r.input_length)
        total += r.input_length
        for j in range(len(r.hash_ids)):  # every prompt block, now the most recently used
            key = r.hash_ids[: j + 1]
            cache[key] = None
            cache.move_to_end(key)
        while blocks is not None and len(cache) > blocks:
            cache.popitem(last=False)
    return reused / total if total else 0.0
