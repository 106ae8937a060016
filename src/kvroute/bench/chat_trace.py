"""The demo's chat workload as a Mooncake-format trace, for `kvroute bench trace` to replay open
loop: capacity at an SLO and vllm-router side by side, as on a production trace."""

# Each hash id stands for one simulated engine block (`TraceScaling`'s default 1/32 scale makes
# a hash id's 512 trace tokens 16 simulator tokens), so one request's hash ids are its group's
# system prompt, the user's earlier questions and answers, and this question, each rounded up
# to whole blocks and unique to what it stands for: equal ids exactly where the demo's prompts
# share tokens. Lengths are in trace tokens (× 32 at that scale); arrivals are Poisson at
# `rate_per_s`, in the demo's order (turn-major, users shuffled; bench/workload.py), so a user's
# next question arrives about one population's worth of requests later.

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvroute.bench.trace_workload import TRACE_BLOCK_TOKENS, TraceScaling
from kvroute.bench.workload import ChatWorkloadSpec

__all__ = ["chat_trace_rows", "write_chat_trace"]


def chat_trace_rows(
    spec: ChatWorkloadSpec, rate_per_s: float, *, scaling: TraceScaling | None = None
) -> Iterator[dict[str, Any]]:
    """The trace lines of `spec`'s workload at `rate_per_s` requests per second."""
    if not (math.isfinite(rate_per_s) and rate_per_s > 0):
        raise ValueError(f"rate_per_s: expected > 0, got {rate_per_s}")
    s = scaling or TraceScaling()
    per_id = s.tokens_per_hash  # simulator tokens behind one hash id
    to_trace = TRACE_BLOCK_TOKENS / per_id  # trace tokens per simulator token
    rng = random.Random(spec.seed)  # drawn in ChatWorkload's order: the demo's turns and lengths
    arrivals = random.Random(f"arrivals-{spec.seed}")
    next_id = 0

    def ids(tokens: int) -> list[int]:
        nonlocal next_id
        n = max(1, math.ceil(tokens / per_id))
        out = list(range(next_id, next_id + n))
        next_id += n
        return out

    systems = [ids(spec.system_tokens) for _ in range(spec.groups)]
    history: dict[int, list[int]] = {}
    at_ms = 0.0
    for _turn in range(spec.turns):
        users = list(range(spec.users))
        rng.shuffle(users)
        for u in users:
            question = spec.user_tokens + rng.randint(
                -spec.user_tokens_jitter, spec.user_tokens_jitter
            )
            earlier = history.setdefault(u, [])
            asked = ids(question)
            hash_ids = [*systems[u // spec.users_per_group], *earlier, *asked]
            yield {
                "timestamp": round(at_ms),
                "input_length": len(hash_ids) * TRACE_BLOCK_TOKENS,
                "output_length": round(spec.answer_tokens * to_trace),
                "hash_ids": hash_ids,
            }
            # The next turn's prompt holds this question and its answer.
            earlier.extend(asked)
            earlier.extend(ids(spec.answer_tokens))
            at_ms += arrivals.expovariate(rate_per_s) * 1000.0


def write_chat_trace(path: Path, spec: ChatWorkloadSpec, rate_per_s: float) -> int:
    """Write the trace to `path` (JSON lines); returns the number of requests."""
    n = 0
    with path.open("w", encoding="utf-8") as out:
        for row in chat_trace_rows(spec, rate_per_s):
            out.write(json.dumps(row) + "\n")
            n += 1
    return n
