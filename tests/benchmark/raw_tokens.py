"""What leaving token ids as msgpack bytes saves: the ingest workload's payloads decoded by
`BatchDecoder()` (a Python int per token) and `BatchDecoder(raw_tokens=True)` (the native index
reads the bytes), each then applied to a fresh native index; CPU µs per event, decode and
apply apart, best of 3, the two modes interleaved so load on the machine hits both alike.

See docs/notes/issue-12-next.md.

    .venv/bin/python -m tests.benchmark.raw_tokens
"""

from __future__ import annotations

import time

from kvroute.bench.ingest_workload import ChainedWorkload
from kvroute.core import EventCounters
from kvroute.events import BatchDecoder, VllmEventBatch, encode_batch

EVENTS = 100_000


def _run(payloads: list[bytes], raw: bool) -> tuple[float, float]:
    from kvroute.index.native_index import NativePrefixIndex

    decoder = BatchDecoder(raw_tokens=raw)
    index = NativePrefixIndex(counters=EventCounters())
    index.add_source("bench/0", engine="bench", model="m")
    decode = apply = 0.0
    for p in payloads:
        t0 = time.thread_time()
        batch = decoder.decode(p)
        t1 = time.thread_time()
        index.apply("bench/0", batch)
        apply += time.thread_time() - t1
        decode += t1 - t0
    return decode, apply


def main() -> None:
    print("events/msg  mode       decode µs/ev  apply µs/ev  total µs/ev")
    for per in (1, 10, 50):
        workload = ChainedWorkload()
        payloads = [
            encode_batch(VllmEventBatch(ts=1.0, events=workload.events(per)))
            for _ in range(EVENTS // per)
        ]
        best: dict[bool, tuple[float, float]] = {}
        for _ in range(3):
            for raw in (False, True):
                got = _run(payloads, raw)
                if raw not in best or sum(got) < sum(best[raw]):
                    best[raw] = got
        for raw in (False, True):
            d, a = (x / EVENTS * 1e6 for x in best[raw])
            mode = "raw bytes" if raw else "int lists"
            print(f"{per:>10}  {mode:<9}  {d:>12.2f}  {a:>11.2f}  {d + a:>11.2f}")


if __name__ == "__main__":
    main()
