"""How much of decoding is creating token ints: the ingest workload's payloads decoded by
`BatchDecoder` and by a Struct that keeps `token_ids` as `msgspec.Raw`.

See docs/notes/issue-12-next.md.

    .venv/bin/python -m tests.benchmark.raw_tokens
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from kvroute.bench.ingest_workload import ChainedWorkload
from kvroute.events import BatchDecoder, VllmEventBatch, encode_batch


class _Stored(msgspec.Struct, tag_field="type", tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None = None
    token_ids: msgspec.Raw = msgspec.Raw(b"")
    block_size: int = 0
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: msgspec.Raw | None = None
    group_idx: int | None = None
    lookahead_token_ids: msgspec.Raw | None = None


class _Removed(msgspec.Struct, tag_field="type", tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None = None
    group_idx: int | None = None


class _Batch(msgspec.Struct, array_like=True):
    ts: float
    events: list[_Stored | _Removed]
    data_parallel_rank: int | None = None


def _best_us_per_event(decode: Callable[[bytes], object], payloads: list[bytes], per: int) -> float:
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for p in payloads:
            decode(p)
        best = min(best, (time.perf_counter() - t) / len(payloads) / per * 1e6)
    return best


def main() -> None:
    workload = ChainedWorkload()
    raw = msgspec.msgpack.Decoder(_Batch)
    for per in (1, 10, 50):
        payloads = [
            encode_batch(VllmEventBatch(ts=1.0, events=workload.events(per))) for _ in range(2000)
        ]
        typed = _best_us_per_event(BatchDecoder().decode, payloads, per)
        untouched = _best_us_per_event(raw.decode, payloads, per)
        print(f"{per:>3} events/msg: today {typed:.2f} µs/event, token_ids as Raw {untouched:.2f}")


if __name__ == "__main__":
    main()
