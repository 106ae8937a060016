"""The index's own ingest-latency tail: the latency bench's messages applied one per 200 µs to
an index holding 10⁶ blocks, idle upkeep between; apply CPU per message (no transport)."""

# docs/notes/issue-12-next.md, seventh session: a growth's page faults showed here as 14-28 ms
# of CPU in one apply before the next table was made ahead. CPU time (thread_time), so another
# process taking the core does not count; wall time is printed beside it.
#
#     .venv/bin/python -m tests.benchmark.apply_tail [messages]

from __future__ import annotations

import gc
import sys
import time

from kvroute.bench import ingest_bench
from kvroute.events import BatchDecoder, VllmEventBatch, encode_batch
from kvroute.index import create_index

_INTERVAL = 200e-6  # 10 events a message at 50 k events/s


def _q(values: list[float], p: float) -> float:
    ordered = sorted(values) or [0.0]
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1e3


def main(messages: int = 20_000) -> None:
    index = create_index(ingest_bench._LATENCY_LIMITS)
    source = ingest_bench._SOURCE
    index.add_source(source, engine="bench", model=ingest_bench._MODEL)
    ingest_bench._prefill(index, ingest_bench._TARGET_BLOCKS_HELD)
    workload = ingest_bench._workload()
    payloads = [
        encode_batch(VllmEventBatch(ts=1.0, events=workload.events(10))) for _ in range(messages)
    ]
    decoder = BatchDecoder(raw_tokens=index.raw_tokens)
    gc.collect()
    clock, cpu = time.perf_counter, time.thread_time
    walls: list[float] = []
    cpus: list[float] = []
    slices: list[float] = []  # idle upkeep slices: a message arriving meanwhile waits
    start = clock()
    for k, payload in enumerate(payloads):
        due = start + (k + 1) * _INTERVAL
        t, c = clock(), cpu()
        index.apply(source, decoder.decode(payload))
        walls.append(clock() - t)
        cpus.append(cpu() - c)
        while clock() < due - 40e-6:
            c = cpu()
            more = index.maintain(source)
            slices.append(cpu() - c)
            if not more:
                break
        while clock() < due:
            pass
    print(f"{messages:,} messages, {index.source_block_count(source):,} blocks at the end")
    for name, values in (("apply CPU", cpus), ("apply wall", walls), ("upkeep slice CPU", slices)):
        print(
            f"  {name:17} ms: p50 {_q(values, 0.5):.3f}  p99 {_q(values, 0.99):.3f}  "
            f"p999 {_q(values, 0.999):.3f}  max {max(values, default=0) * 1e3:.3f}"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)
