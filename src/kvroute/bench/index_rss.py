"""Child process of the index memory benchmark: fill one index in a fresh interpreter and print
its RSS growth and full-gc pause as JSON, so memory outside Python's allocator counts too."""

from __future__ import annotations

import gc
import json
import os
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str]) -> None:
    from kvroute.bench import index_bench

    name, blocks, sources, holders = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    factory = index_bench.factories()[name]
    gc.collect()
    gc.freeze()  # start-up objects, as a service can after start-up: the pause is the index's
    base = _rss_bytes()
    index = factory()
    index_bench.fill(index, blocks, sources, holders)
    gc.collect()
    grown = _rss_bytes() - base
    pauses = []
    for _ in range(3):
        t0 = time.perf_counter()
        gc.collect()
        pauses.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"rss_growth_bytes": grown, "gc_pause_ms": sorted(pauses)[1]}))


if __name__ == "__main__":
    main(sys.argv[1:])
