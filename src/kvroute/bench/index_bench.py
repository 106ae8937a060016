"""Index benchmarks: (a) apply rate, (c) memory and GC pause, (d) match latency, (e) clear stall;
the native core and the Python reference next to an in-run baseline (a naive dict-of-sets)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kvroute.bench.report import DEFAULT_OUT_DIR, print_table, save_json
from kvroute.core import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineHash,
    EventBatch,
    LocalHash,
    SourceId,
    source_id,
)
from kvroute.events import BatchDecoder, VllmBlockStored, VllmEventBatch, encode_batch
from kvroute.index import IndexLimits, PrefixIndex, create_index
from kvroute.index.hashing import chain_hashes, prompt_hashes, seed_hash
from kvroute.index.impl import native_error

__all__ = [
    "DEFAULT_OUT_DIR",
    "NaiveIndex",
    "factories",
    "fill",
    "run",
    "run_apply",
    "run_match",
    "run_memory",
    "run_stalls",
]

MODEL = "bench-model"
NATIVE = "kvroute native"  # the compiled core (index/native_index.py)
PYTHON = "kvroute python"  # the reference model (index/prefix_index.py)
NAIVE = "naive dict-of-sets"  # the in-run baseline
_UNBOUNDED = IndexLimits(max_index_bytes=1 << 50)  # no bound: the benchmarks measure growth


def factories() -> dict[str, Callable[[], Any]]:
    """The indexes compared, by name; the native one only when it is built."""
    out: dict[str, Callable[[], Any]] = {}
    if native_error() is None:
        out[NATIVE] = lambda: create_index(_UNBOUNDED, impl="native")
    out[PYTHON] = lambda: PrefixIndex(_UNBOUNDED)
    out[NAIVE] = NaiveIndex
    return out


@dataclass(frozen=True)
class _Size:
    apply_events: int
    memory_blocks: tuple[int, ...]
    match_blocks: int
    match_engines: tuple[int, ...]
    match_prompts: tuple[int, ...]
    match_reps: int
    gc_reps: int


_SIZES = {
    "smoke": _Size(20_000, (100_000,), 20_000, (4, 16), (1024, 8192), 20, 2),
    "full": _Size(
        1_000_000, (1_000_000, 10_000_000), 1_000_000, (16, 64), (1024, 8192, 32768), 300, 5
    ),
}


class _Index(Protocol):
    def add_source(self, source: SourceId, *, engine: str, model: str) -> None: ...
    def apply(self, source: SourceId, batch: EventBatch) -> None: ...


class NaiveIndex:
    """The baseline: engine hash -> local hash per source, local hash -> set of holders, and a
    (source, local) -> refcount dict; the same hash function, no bitmasks, no care for the GC."""

    def __init__(self) -> None:
        self.models: dict[SourceId, str] = {}
        self.engines: dict[SourceId, str] = {}
        self.emap: dict[SourceId, dict[EngineHash, int]] = {}
        self.holders: dict[int, set[SourceId]] = {}
        self.refs: dict[tuple[SourceId, int], int] = {}

    def add_source(self, source: SourceId, *, engine: str, model: str) -> None:
        self.models[source] = model
        self.engines[source] = engine
        self.emap[source] = {}

    def apply(self, source: SourceId, batch: EventBatch) -> None:
        emap = self.emap[source]
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                if ev.token_ids is None or ev.block_size is None:
                    continue
                if ev.parent_block_hash is None:
                    parent: int | None = seed_hash(self.models[source], ev.lora_name)
                else:
                    parent = emap.get(ev.parent_block_hash)
                if parent is None:
                    continue
                hashes = chain_hashes(LocalHash(parent), ev.token_ids, ev.block_size)
                for eh, local in zip(ev.block_hashes, hashes, strict=False):
                    emap[eh] = local
                    self.holders.setdefault(local, set()).add(source)
                    self.refs[(source, local)] = self.refs.get((source, local), 0) + 1
            elif isinstance(ev, BlockRemoved):
                for eh in ev.block_hashes:
                    found = emap.get(eh)
                    if found is None:
                        continue
                    n = self.refs[(source, found)] - 1
                    if n:
                        self.refs[(source, found)] = n
                        continue
                    del self.refs[(source, found)], emap[eh]
                    holders = self.holders[found]
                    holders.discard(source)
                    if not holders:
                        del self.holders[found]

    def match(self, model: str, tokens: Sequence[int], block_size: int) -> dict[str, int]:
        hashes = prompt_hashes(model, None, tokens, block_size)
        alive = {s for s, m in self.models.items() if m == model}
        lengths: dict[SourceId, int] = {}
        empty: set[SourceId] = set()
        for i, h in enumerate(hashes):
            still = alive & self.holders.get(h, empty)
            for s in alive - still:
                lengths[s] = i
            alive = still
            if not alive:
                break
        for s in alive:
            lengths[s] = len(hashes)
        out: dict[str, int] = {}
        for s, n in lengths.items():
            if n > out.get(self.engines[s], 0):
                out[self.engines[s]] = n
        return out


# --- (a) apply rate -----------------------------------------------------------------------------


def _aibrix_batches(n: int, per_batch: int) -> Iterator[EventBatch]:
    """1-block BlockStored events of 100 tokens, block size 100, unique hashes."""
    tail = list(range(1, 100))
    for b in range(0, n, per_batch):
        events: list[Any] = [
            BlockStored([(1 << 63) + i], None, [i, *tail], 100, None, "GPU", 0)
            for i in range(b, min(n, b + per_batch))
        ]
        yield EventBatch(float(b), events)


def _aibrix_payloads(n: int, per_batch: int) -> list[bytes]:
    """The AIBrix events as an engine publishes them: one msgpack message per batch."""
    return [encode_batch(_wire(b)) for b in _aibrix_batches(n, per_batch)]


def _wire(batch: EventBatch) -> VllmEventBatch:
    """An AIBrix batch as the engine publishes it (its events are all `_aibrix_batches` stores)."""
    events: list[Any] = batch.events
    return VllmEventBatch(
        ts=batch.ts,
        events=[
            VllmBlockStored(
                block_hashes=ev.block_hashes,
                parent_block_hash=ev.parent_block_hash,
                token_ids=ev.token_ids,
                block_size=ev.block_size,
                medium=ev.medium,
            )
            for ev in events
        ],
    )


# Messages decoded, then applied, per timed stretch: live ingest's receive slice (events/_recv.c).
_SLICE = 32


def _time_apply(index: _Index, payloads: list[bytes], *, raw: bool = False) -> float:
    """Seconds in `index.apply` alone, the payloads taken in live ingest's shape: a slice of
    messages decoded (outside the clock; `raw`: token ids kept as msgpack bytes, which the C
    apply reads, as live ingest hands them to the native index, design §12), then applied.
    Building the events in Python between applies instead (8,192 at a time, as this bench
    did until 2026-12-08) evicted the index's tables from the caches: the same applies ran
    20-30 % slower than between live decodes (docs/notes/issue-12-next.md)."""
    src = source_id("engine-0", 0)
    index.add_source(src, engine="engine-0", model=MODEL)
    decode = BatchDecoder(raw_tokens=raw).decode
    apply = index.apply
    elapsed = 0.0
    for lo in range(0, len(payloads), _SLICE):
        batches = [decode(p) for p in payloads[lo : lo + _SLICE]]
        t0 = time.perf_counter()
        for batch in batches:
            apply(src, batch)
        elapsed += time.perf_counter() - t0
    return elapsed


def run_apply(size: str = "smoke", out_dir: Path = DEFAULT_OUT_DIR) -> dict[str, Any]:
    """(a) Index apply only, the AIBrix workload, in inserts/s (target ≥ 2,000,000/s native)."""
    n = _SIZES[size].apply_events
    rows = []
    results: list[dict[str, Any]] = []
    made = factories()
    # Token ids as Python int lists (msgspec's typed decode, as the Python index takes them),
    # and for the native index also as live ingest hands them over: msgpack bytes (`raw`,
    # design §12).
    runs = [
        (name, per_batch, raw)
        for per_batch in (1, 32)
        for name in (NATIVE, PYTHON)
        if name in made
        for raw in ((False, True) if name == NATIVE else (False,))
    ]
    runs.append((NAIVE, 32, False))
    rates: dict[tuple[str, int], float] = {}
    # The runs come by events per batch, so one set of payloads is held at a time.
    held_for, payloads = 0, list[bytes]()
    for name, per_batch, raw in runs:
        if per_batch != held_for:
            payloads = []  # the last set freed before the next is made
            held_for, payloads = per_batch, _aibrix_payloads(n, per_batch)
        gc.collect()
        seconds = _time_apply(made[name](), payloads, raw=raw)
        rate = n / seconds
        if not raw:
            rates[(name, per_batch)] = rate
        results.append(
            {
                "index": name,
                "token_ids": "msgpack bytes (live ingest)" if raw else "int list",
                "events_per_batch": per_batch,
                "events": n,
                "inserts_per_s": rate,
            }
        )
    for r in results:
        base = rates.get((PYTHON, r["events_per_batch"]))
        r["vs_python"] = r["inserts_per_s"] / base if base else None
        rows.append(
            (
                r["index"],
                r["token_ids"],
                r["events_per_batch"],
                n,
                r["inserts_per_s"],
                1e9 / r["inserts_per_s"],
                f"{r['vs_python']:.2f}×" if r["vs_python"] else "",
            )
        )
    print_table(
        f"(a) index apply, AIBrix workload (1-block events, 100 tokens, block 100), size={size}; "
        "target ≥ 2,000,000 inserts/s",
        ["index", "token ids", "events/batch", "events", "inserts/s", "ns/insert", "vs python"],
        rows,
    )
    data = {"size": size, "target_inserts_per_s": 2_000_000, "results": results}
    save_json("index_apply", data, out_dir)
    return data


# --- (c) memory and GC pause ------------------------------------------------------------------


def fill(index: _Index, blocks: int, sources: int, holders_per_block: int) -> None:
    """`blocks` (block, source) pairs: blocks // holders distinct 4-block chains of 16 tokens,
    each chain stored by `holders_per_block` sources (round robin)."""
    srcs = [source_id(f"engine-{i}", 0) for i in range(sources)]
    for s in srcs:
        index.add_source(s, engine=s.rpartition("/")[0], model=MODEL)
    chains = blocks // holders_per_block // 4
    k = 0
    for c in range(chains):
        tokens = [c >> 16, c & 0xFFFF, *range(62)]
        for h in range(holders_per_block):
            src = srcs[(c * holders_per_block + h) % sources]
            ehs: list[EngineHash] = [(1 << 63) + 4 * k + j for j in range(4)]
            k += 1
            index.apply(src, EventBatch(0.0, [BlockStored(ehs, None, tokens, 16)]))


def _in_child(name: str, blocks: int, sources: int, holders: int) -> dict[str, Any]:
    # A fresh interpreter per point: RSS growth then counts native memory and nothing earlier.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvroute.bench.index_rss",
            name,
            str(blocks),
            str(sources),
            str(holders),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_memory(size: str = "smoke", out_dir: Path = DEFAULT_OUT_DIR) -> dict[str, Any]:
    """(c) RSS growth per (block, source) of a fresh process while indexing (target ≤ 48 B
    native) and the full `gc.collect()` pause with the index filled (target < 5 ms)."""
    cfg = _SIZES[size]
    rows: list[tuple[Any, ...]] = []
    results: list[dict[str, Any]] = []
    names = [n for n in (NATIVE, PYTHON, NAIVE) if n in factories()]
    for blocks in cfg.memory_blocks:
        for sources, holders in ((1, 1), (16, 4)):
            for name in names:
                if name == NAIVE and blocks > 1_000_000:
                    continue  # gigabytes of sets, and the point is made at 10^6
                got = _in_child(name, blocks, sources, holders)
                per_pair = got["rss_growth_bytes"] / blocks
                results.append(
                    {
                        "index": name,
                        "block_source_pairs": blocks,
                        "sources": sources,
                        "holders_per_block": holders,
                        "bytes_per_block_source": per_pair,
                        "gc_pause_ms": got["gc_pause_ms"],
                    }
                )
                rows.append((name, blocks, sources, holders, per_pair, got["gc_pause_ms"]))
    print_table(
        f"(c) RSS growth of a fresh process per (block, source) and full gc pause "
        f"(start-up objects frozen), size={size}; targets ≤ 48 B (native), gc < 5 ms",
        ["index", "(block,src) pairs", "srcs", "holders", "B/pair", "gc ms"],
        rows,
    )
    data = {
        "size": size,
        "target_bytes_per_block_source": 48,
        "target_gc_pause_ms": 5.0,
        "results": results,
    }
    save_json("index_memory", data, out_dir)
    return data


# --- (e) clear stall ----------------------------------------------------------------------------


def run_stalls(size: str = "smoke", out_dir: Path = DEFAULT_OUT_DIR) -> dict[str, Any]:
    """(e) How long one call blocks the event loop when a source holding many blocks is dropped
    (AllBlocksCleared, an engine restart's reset): target < 5 ms at 10^6 blocks."""
    blocks = _SIZES[size].match_blocks
    rows = []
    results = []
    made = factories()
    for name in (NATIVE, PYTHON):
        if name not in made:
            continue
        index = made[name]()
        fill(index, 2 * blocks, 2, 1)  # two sources, `blocks` each
        cleared, reset = source_id("engine-0", 0), source_id("engine-1", 0)
        t0 = time.perf_counter()
        index.apply(cleared, EventBatch(0.0, [AllBlocksCleared()]))
        t1 = time.perf_counter()
        index.reset_source(reset)
        t2 = time.perf_counter()
        clear_ms, reset_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        results.append(
            {"index": name, "blocks": blocks, "clear_ms": clear_ms, "reset_ms": reset_ms}
        )
        rows.append((name, blocks, clear_ms, reset_ms))
        del index
        gc.collect()
    print_table(
        f"(e) event-loop stall dropping one source's blocks, size={size}; target < 5 ms",
        ["index", "blocks held", "AllBlocksCleared ms", "reset_source ms"],
        rows,
    )
    data = {"size": size, "target_ms": 5.0, "results": results}
    save_json("index_stalls", data, out_dir)
    return data


# --- (d) match latency --------------------------------------------------------------------------


def _prompt(seed: int, n_tokens: int) -> list[int]:
    return [(seed * 7919 + i * 104_729) % 128_000 for i in range(n_tokens)]


def _fill_for_match(
    index: _Index, engines: int, total_blocks: int, prompt_sizes: Sequence[int], per_size: int
) -> dict[int, list[list[int]]]:
    """Engine e holds the first (e+1)/engines of every test prompt (so the longest match is the
    whole prompt: every block is hashed and looked up), the rest of `total_blocks` is filler."""
    bs = 16
    srcs = [source_id(f"engine-{e}", 0) for e in range(engines)]
    for s in srcs:
        index.add_source(s, engine=s.rpartition("/")[0], model=MODEL)
    used = 0
    next_eh = 1 << 63
    prompts: dict[int, list[list[int]]] = {}
    for n_tokens in prompt_sizes:
        prompts[n_tokens] = []
        for p in range(per_size):
            tokens = _prompt(n_tokens * 1000 + p, n_tokens)
            prompts[n_tokens].append(tokens)
            n_blocks = n_tokens // bs
            for e, src in enumerate(srcs):
                held = max(1, n_blocks * (e + 1) // engines)
                ehs: list[EngineHash] = list(range(next_eh, next_eh + held))
                next_eh += held
                used += held
                index.apply(src, EventBatch(0.0, [BlockStored(ehs, None, tokens[: held * bs], bs)]))
    filler_chain = 32
    c = 0
    while used < total_blocks:
        src = srcs[c % engines]
        held = min(filler_chain, total_blocks - used)
        tokens = [c >> 16, c & 0xFFFF, *range(held * bs - 2)]
        filler: list[EngineHash] = list(range(next_eh, next_eh + held))
        next_eh += held
        used += held
        c += 1
        index.apply(src, EventBatch(0.0, [BlockStored(filler, None, tokens, bs)]))
    return prompts


def _percentiles(samples_ns: list[int]) -> tuple[float, float]:
    s = sorted(samples_ns)
    return s[len(s) // 2] / 1e3, s[min(len(s) - 1, int(len(s) * 0.99))] / 1e3


def _match_latency(
    index: PrefixIndex | NaiveIndex, prompts: list[list[int]], reps: int, engines: int
) -> tuple[float, float]:
    samples = []
    last = f"engine-{engines - 1}"
    for r in range(reps):
        tokens = prompts[r % len(prompts)]
        if isinstance(index, PrefixIndex):  # either implementation
            t0 = time.perf_counter_ns()
            result = index.match(MODEL, None, tokens)
            samples.append(time.perf_counter_ns() - t0)
            blocks = result[last].blocks
        else:
            t0 = time.perf_counter_ns()
            naive = index.match(MODEL, tokens, 16)
            samples.append(time.perf_counter_ns() - t0)
            blocks = naive[last]
        if blocks != len(tokens) // 16:
            raise AssertionError(f"benchmark index is wrong: {last} holds {blocks} blocks")
    return _percentiles(samples)


def run_match(size: str = "smoke", out_dir: Path = DEFAULT_OUT_DIR) -> dict[str, Any]:
    """(d) `match` latency p50/p99 for 1k/8k/32k-token prompts against 16 and 64 engines holding
    10^6 blocks in total, hashing included (targets p99 ≤ 100 µs at 8k tokens × 64 engines,
    ≤ 400 µs at 32k)."""
    cfg = _SIZES[size]
    rows = []
    results = []
    per_size = 4
    for engines in cfg.match_engines:
        for name, factory in factories().items():
            index = factory()
            prompts = _fill_for_match(index, engines, cfg.match_blocks, cfg.match_prompts, per_size)
            gc.collect()
            for n_tokens in cfg.match_prompts:
                p50, p99 = _match_latency(index, prompts[n_tokens], cfg.match_reps, engines)
                results.append(
                    {
                        "index": name,
                        "engines": engines,
                        "prompt_tokens": n_tokens,
                        "blocks_total": cfg.match_blocks,
                        "p50_us": p50,
                        "p99_us": p99,
                        "reps": cfg.match_reps,
                    }
                )
                rows.append((name, engines, n_tokens, cfg.match_blocks, p50, p99))
            del index, prompts
            gc.collect()
    print_table(
        f"(d) match latency (block 16; engine e holds (e+1)/E of each prompt), size={size}; "
        "targets p99 ≤ 100 µs at 8k × 64, ≤ 400 µs at 32k",
        ["index", "engines", "prompt tokens", "blocks total", "p50 µs", "p99 µs"],
        rows,
    )
    data = {
        "size": size,
        "target_p99_us_8k_x64": 100,
        "target_p99_us_32k_x64": 400,
        "results": results,
    }
    save_json("index_match", data, out_dir)
    return data


def run(size: str = "smoke", out_dir: Path = DEFAULT_OUT_DIR) -> dict[str, Any]:
    """All index benchmarks: (a) apply, (c) memory, (d) match, (e) stalls."""
    if size not in _SIZES:
        raise ValueError(f"size: expected one of {sorted(_SIZES)}, got {size!r}")
    return {
        "apply": run_apply(size, out_dir),
        "memory": run_memory(size, out_dir),
        "match": run_match(size, out_dir),
        "stalls": run_stalls(size, out_dir),
    }
