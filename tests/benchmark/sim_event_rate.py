"""KV events a busy vLLM engine publishes, measured on the project's simulator, and what the
router spends on them (issue 12, deliverable 5; docs/notes/issue-12-scaling.md).

One simulated engine (`kvroute.sim.scheduler.SimScheduler`, the scheduler and block pool
`kvroute sim` runs, on its virtual clock, so the figures do not depend on this machine's speed)
is fed the Mooncake trace (../shared/traces/mooncake_synthetic_trace.jsonl: 512-token hash
blocks, equal ids = equal prefix) with arrivals compressed `--speedup` times, so that it is
saturated (its queue never empties). Each step's events are what the engine publishes as one
message. Reported per simulated second, after `--warmup` s (the pool fills first): messages,
events (stored / removed), blocks (stored / removed), token ids carried and payload bytes.

Then the router side: the messages' payloads (`encode_batch`, vLLM 0.33 map shape) decoded by
`BatchDecoder` and applied to the native index (which already holds `--prefill` blocks of
another source), timed as the main thread's CPU time: CPU µs per engine-second. The per-message
wake-up of a live socket is not in that figure (docs/notes/issue-12-profile.md: ≈85-110 µs of
CPU when every message wakes the loop alone; it amortises when several engines' messages
arrive per wake-up).

    .venv/bin/python -m tests.benchmark.sim_event_rate [--seconds 120] [--speedup 20]
        [--num-gpu-blocks 8192] [--prefill-tok-per-s 16000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from kvroute.core import source_id
from kvroute.events import BatchDecoder, VllmBlockRemoved, VllmBlockStored, encode_batch
from kvroute.events.vllm_events import VllmEventBatch
from kvroute.index import IndexLimits, create_index
from kvroute.sim.scheduler import SchedulerConfig, SimRequest, SimScheduler

TRACE = Path(__file__).resolve().parents[2] / ".." / "shared" / "traces"
TRACE_FILE = TRACE / "mooncake_synthetic_trace.jsonl"
TRACE_BLOCK = 512  # tokens per hash id in the trace
VOCAB = 32_000


def hash_block_tokens(hid: int) -> list[int]:
    """The 512 token ids of trace hash id `hid`: its id and each 16-token block's number up
    front, so no two hash ids (or blocks within one) have the same tokens."""
    out: list[int] = []
    for k in range(TRACE_BLOCK // 16):
        out += [hid % VOCAB, hid // VOCAB % VOCAB, k]
        out += [(hid * 7919 + k * 104_729 + j * 31) % VOCAB for j in range(13)]
    return out


def load_requests(path: Path, speedup: float, limit_s: float) -> list[SimRequest]:
    """The trace's requests arriving before `limit_s` simulated seconds, arrivals / speedup."""
    cache: dict[int, list[int]] = {}
    out: list[SimRequest] = []
    with path.open() as f:
        for n, line in enumerate(f):
            row = json.loads(line)
            arrival = row["timestamp"] / 1000.0 / speedup
            if arrival > limit_s:
                break
            prompt: list[int] = []
            for hid in row["hash_ids"]:
                block = cache.get(hid)
                if block is None:
                    block = cache[hid] = hash_block_tokens(hid)
                prompt += block
            prompt = prompt[: row["input_length"]]
            output = [(n * 131 + i * 7) % VOCAB for i in range(max(1, row["output_length"]))]
            out.append(SimRequest(f"r{n}", prompt, output, arrival))
    return out


def simulate(args: argparse.Namespace) -> tuple[dict[str, Any], list[bytes]]:
    config = SchedulerConfig(
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        max_num_seqs=args.max_num_seqs,
        prefill_tok_per_s=args.prefill_tok_per_s,
        decode_step_s=args.decode_step_ms / 1000.0,
    )
    sched = SimScheduler(config)
    end = args.warmup + args.seconds
    skipped = 0
    for req in load_requests(args.trace, args.speedup, end):
        if sched.fits(len(req.prompt), len(req.output)):
            sched.add(req)
        else:
            skipped += 1
    counts = dict.fromkeys(
        (
            "messages",
            "events",
            "stored_events",
            "removed_events",
            "blocks_stored",
            "blocks_removed",
            "tokens",
            "bytes",
        ),
        0,
    )
    payloads: list[bytes] = []
    per_message_events: list[int] = []
    busy_steps = idle_gaps = 0
    last_end = 0.0
    t0 = time.process_time()
    while True:
        out = sched.step()
        if out is None or out.end > end:
            break
        if out.start > last_end + 1e-9 and out.end > args.warmup:
            idle_gaps += 1
        last_end = out.end
        if out.end <= args.warmup or not out.events:
            continue
        busy_steps += 1
        payload = encode_batch(VllmEventBatch(out.end, out.events, 0))
        payloads.append(payload)
        counts["messages"] += 1
        counts["bytes"] += len(payload)
        counts["events"] += len(out.events)
        per_message_events.append(len(out.events))
        for ev in out.events:
            if isinstance(ev, VllmBlockStored):
                counts["stored_events"] += 1
                counts["blocks_stored"] += len(ev.block_hashes)
                counts["tokens"] += len(ev.token_ids)
            elif isinstance(ev, VllmBlockRemoved):
                counts["removed_events"] += 1
                counts["blocks_removed"] += len(ev.block_hashes)
    sim_cpu = time.process_time() - t0
    seconds = args.seconds
    result: dict[str, Any] = {
        "trace": str(args.trace.name),
        "speedup": args.speedup,
        "simulated_seconds": seconds,
        "warmup_seconds": args.warmup,
        "config": {
            "block_size": args.block_size,
            "num_gpu_blocks": args.num_gpu_blocks,
            "max_num_seqs": args.max_num_seqs,
            "prefill_tok_per_s": args.prefill_tok_per_s,
            "decode_step_ms": args.decode_step_ms,
        },
        "requests_finished": sched.finished_total,
        "requests_waiting_at_end": sched.num_waiting,
        "requests_skipped_too_long": skipped,
        "idle_gaps_after_warmup": idle_gaps,
        "prefix_hit_rate": sched.prefix_hit_tokens / max(1, sched.prefix_queries_tokens),
        "per_s": {k: v / seconds for k, v in counts.items()},
        "blocks_per_s": (counts["blocks_stored"] + counts["blocks_removed"]) / seconds,
        "events_per_message_median": statistics.median(per_message_events or [0]),
        "events_per_message_max": max(per_message_events or [0]),
        "simulator_cpu_seconds": sim_cpu,
    }
    return result, payloads


def router_cost(payloads: list[bytes], seconds: float, prefill: int) -> dict[str, Any]:
    """Decode + native apply of the engine's messages, main-thread CPU, index prefilled."""
    from kvroute.bench.ingest_bench import _prefill  # the latency bench's 10⁶-block prefill

    index = create_index(
        IndexLimits(max_blocks_per_source=1 << 30, max_blocks_total=1 << 30), impl="native"
    )
    index.add_source(source_id("bench", 0), engine="bench", model="bench/model")
    _prefill(index, prefill)
    runs = []
    for r in range(3):
        source = source_id(f"sim-{r}", 0)
        index.add_source(source, engine=f"sim-{r}", model="bench/model")
        decoder = BatchDecoder()
        t0 = time.thread_time()
        for payload in payloads:
            index.apply(source, decoder.decode(payload))
        runs.append(time.thread_time() - t0)
        index.remove_source(source)
    cpu = statistics.median(runs)
    return {
        "impl": "native",
        "prefill_blocks": prefill,
        "cpu_seconds_per_engine_second": cpu / seconds,
        "cpu_us_per_message": cpu / max(1, len(payloads)) * 1e6,
        "runs_cpu_seconds": runs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trace", type=Path, default=TRACE_FILE)
    p.add_argument("--speedup", type=float, default=20.0, help="arrivals compressed this much")
    p.add_argument("--seconds", type=float, default=120.0, help="simulated seconds measured")
    p.add_argument("--warmup", type=float, default=30.0, help="simulated seconds left out")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-gpu-blocks", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--prefill-tok-per-s", type=float, default=16_000.0)
    p.add_argument("--decode-step-ms", type=float, default=12.0)
    p.add_argument("--prefill", type=int, default=1_000_000, help="blocks held by the index")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result, payloads = simulate(args)
    result["router"] = router_cost(payloads, args.seconds, args.prefill)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
