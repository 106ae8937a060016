"""`kvroute bench flood`: honest `/v1/route` latency and gateway memory without and with a
hostile publisher flooding unique blocks, ingest limits on and off."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kvroute.bench.processes import GatewayProcess, free_port, rss_bytes
from kvroute.bench.report import DEFAULT_OUT_DIR, bar_chart, print_table, save_json, stop_child
from kvroute.sim import SimConfig, SimFleet

__all__ = ["FloodOptions", "add_arguments", "options", "run"]

MODEL = "sim/flood"
PROMPT_TOKENS = 1024
PROMPTS = 16
# Ingest limits off: the gateway as it was before them (the other limits keep their defaults).
NO_LIMITS = {
    "source_events_per_s": "0",
    "source_bytes_per_s": "0",
    "total_events_per_s": "0",
    "total_bytes_per_s": "0",
}


@dataclass(frozen=True)
class FloodOptions:
    seconds: float = 10.0  # of routing without the flood, then as long with it
    route_rate: float = 50.0  # honest `/v1/route` requests per second
    blocks_per_event: int = 16
    events_per_batch: int = 8
    # What the hostile publisher offers: the probe offered 10.7 M blocks in 20 s.
    blocks_per_s: float = 535_000.0
    modes: tuple[str, ...] = ("limits", "no-limits")
    hostile_sources: int = 1  # hostile publishers, each its own engine and process
    # "blocks": batches of unique BlockStored; "giant": valid batches of `giant_bytes` each, past
    # max_event_message_bytes, at `giant_per_s`
    frames: str = "blocks"
    giant_bytes: int = 17 << 20
    giant_per_s: float = 10.0
    out_dir: Path = DEFAULT_OUT_DIR


def add_arguments(p: argparse._ActionsContainer) -> None:
    d = FloodOptions()
    p.add_argument(
        "--flood-seconds",
        type=float,
        default=d.seconds,
        help="seconds of honest routing without the flood, then as many with it",
    )
    p.add_argument(
        "--route-rate",
        type=float,
        default=d.route_rate,
        help="honest /v1/route requests per second",
    )
    p.add_argument(
        "--flood-blocks-per-s",
        type=float,
        default=d.blocks_per_s,
        help="blocks per second the hostile publisher offers",
    )
    p.add_argument(
        "--flood-modes",
        default=",".join(d.modes),
        help="gateways to flood, comma-separated, of: limits (ingest budgets on, as shipped), "
        "no-limits (ingest budgets off)",
    )
    p.add_argument(
        "--hostile-sources",
        type=int,
        default=d.hostile_sources,
        help="hostile publishers, each an engine of its own",
    )
    p.add_argument(
        "--flood-frames",
        choices=["blocks", "giant"],
        default=d.frames,
        help="what they publish: blocks (unique BlockStored at --flood-blocks-per-s each) or "
        f"giant ({d.giant_bytes >> 20} MiB batches, past max_event_message_bytes, "
        f"{d.giant_per_s:g}/s each)",
    )


def options(args: argparse.Namespace) -> FloodOptions:
    modes = tuple(m for m in str(args.flood_modes).split(",") if m)
    unknown = sorted(set(modes) - {"limits", "no-limits"})
    if unknown or not modes:
        raise ValueError(f"--flood-modes: expected some of limits, no-limits, got {unknown}")
    if args.flood_seconds <= 0 or args.route_rate <= 0 or args.flood_blocks_per_s <= 0:
        raise ValueError("--flood-seconds, --route-rate, --flood-blocks-per-s: expected > 0")
    if args.hostile_sources < 1:
        raise ValueError("--hostile-sources: expected >= 1")
    return FloodOptions(
        hostile_sources=args.hostile_sources,
        frames=args.flood_frames,
        seconds=args.flood_seconds,
        route_rate=args.route_rate,
        blocks_per_s=args.flood_blocks_per_s,
        modes=modes,
        out_dir=args.out_dir,
    )


# --- the hostile publisher, in its own process ------------------------------------------------


def _flood(
    port: int,
    blocks_per_event: int,
    events_per_batch: int,
    blocks_per_s: float,
    giant: tuple[int, float] | None,
    conn: Connection,
) -> None:
    """Bind a PUB on `port`; on "go", publish batches of unique BlockStored events at
    `blocks_per_s` (or, given `giant` (bytes, per second), batches of one store whose
    token_ids make them that large) until "stop"; send back the blocks offered."""
    import msgspec
    import zmq

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, 10_000)
    pub.bind(f"tcp://127.0.0.1:{port}")
    encoder = msgspec.msgpack.Encoder()
    conn.send("bound")
    offered = seq = 0
    try:
        if conn.recv() != "go":
            return
        next_hash = 1
        tokens = list(range(blocks_per_event * 16))
        per_batch = blocks_per_event * events_per_batch
        if giant is not None:  # one store of n blocks whose ids are 4-byte ints: size bytes
            n = giant[0] // (5 * 16) + 1
            stored = ["BlockStored", list(range(1, n + 1)), None, [1 << 20] * (n * 16), 16, None]
            giant_payload = encoder.encode([time.time(), [stored], 0])
            per_batch, blocks_per_s = n, giant[1] * n
        started = time.monotonic()
        while not conn.poll():
            ahead = offered / blocks_per_s - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(min(ahead, 0.01))  # the publisher's own pace
                continue
            if giant is not None:
                pub.send_multipart([b"kv", seq.to_bytes(8, "big"), giant_payload])
                seq += 1
                offered += per_batch
                continue
            events = []
            for _ in range(events_per_batch):
                hashes = list(range(next_hash, next_hash + blocks_per_event))
                events.append(["BlockStored", hashes, None, tokens, 16, None])
                next_hash += blocks_per_event
            payload = encoder.encode([time.time(), events, 0])
            pub.send_multipart([b"kv", seq.to_bytes(8, "big"), payload])
            seq += 1
            offered += per_batch
        conn.recv()
    finally:
        conn.send(offered)
        pub.close(linger=0)
        ctx.term()


# --- measuring ----------------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    return rss_bytes(pid) / 2**20


async def _route_for(
    http: httpx.AsyncClient,
    url: str,
    prompts: list[str],
    seconds: float,
    rate: float,
    pid: int,
) -> dict[str, Any]:
    """Route the honest prompts at `rate` for `seconds`: latencies, answers, peak RSS."""
    latencies: list[float] = []
    honest = 0
    rss_peak = 0.0
    loop = asyncio.get_running_loop()
    start = loop.time()
    i = 0
    while loop.time() - start < seconds:
        body = {"model": MODEL, "prompt": prompts[i % len(prompts)], "max_tokens": 1}
        sent = time.perf_counter()
        reply = await http.post(f"{url}/v1/route", json=body)
        latencies.append(time.perf_counter() - sent)
        answer = reply.json()
        matched = {e["name"]: e["blocks_matched"] for e in answer.get("engines", [])}
        honest += answer.get("engine") == "honest" and matched.get("honest", 0) > 0
        rss_peak = max(rss_peak, _rss_mb(pid))
        i += 1
        # Pacing of the load generator (not a synchronisation): the next request's slot.
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    return {
        "requests": len(ms),
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 3),
        "max_ms": round(ms[-1], 3),
        "routed_to_honest_prefix": honest,
        "rss_peak_mb": round(rss_peak, 1),
    }


async def _counters(http: httpx.AsyncClient, url: str) -> dict[str, float]:
    """The hostile sources' drops, replays, resets, stale time and index blocks, summed."""
    text = (await http.get(f"{url}/metrics")).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            source = sample.labels.get("source", "")
            if not source.startswith("hostile") or sample.name.endswith("_created"):
                continue
            extra = [v for k, v in sample.labels.items() if k != "source"]
            key = sample.name + (f"{{{','.join(extra)}}}" if extra else "")
            out[key] = out.get(key, 0.0) + sample.value
    return out


async def _one(opts: FloodOptions, mode: str, workdir: Path) -> dict[str, Any]:
    config = SimConfig(speed=20.0)
    async with (
        SimFleet(1, MODEL, config=config, name_prefix="honest") as fleet,
        httpx.AsyncClient(trust_env=False, timeout=60) as http,
    ):
        engine = fleet.engines[0]
        ports = [free_port(below_ephemeral=True) for _ in range(opts.hostile_sources)]
        fleet_file = workdir / f"fleet-{mode}.yaml"
        entries = [
            {
                "name": "honest",
                "model": MODEL,
                "url": engine.url,
                "events": engine.events_endpoints[0],
                "replay": engine.replay_endpoints[0],
            },
        ]
        # Their HTTP side is the honest engine's, so they pass health checks: only their events
        # are hostile.
        entries += [
            {
                "name": f"hostile{i}" if i else "hostile",
                "model": MODEL,
                "url": engine.url,
                "events": f"tcp://127.0.0.1:{port}",
            }
            for i, port in enumerate(ports)
        ]
        fleet_file.write_text(yaml.safe_dump({"engines": entries}))
        ctx = multiprocessing.get_context("spawn")
        giant = (opts.giant_bytes, opts.giant_per_s) if opts.frames == "giant" else None
        pipes = [ctx.Pipe() for _ in ports]
        procs = [
            ctx.Process(
                target=_flood,
                args=(
                    port,
                    opts.blocks_per_event,
                    opts.events_per_batch,
                    opts.blocks_per_s,
                    giant,
                    child,
                ),
                daemon=True,
            )
            for port, (_parent, child) in zip(ports, pipes, strict=True)
        ]
        for proc in procs:
            proc.start()
        gateway = GatewayProcess(0, workdir)
        try:
            for parent, _child in pipes:
                if not parent.poll(30) or parent.recv() != "bound":
                    raise RuntimeError("a hostile publisher did not start")
            await gateway.start(fleet_file, {} if mode == "limits" else dict(NO_LIMITS))
            await gateway.wait_ready(http)
            assert gateway.proc is not None
            pid = gateway.proc.pid
            tokenizer = fleet.tokenizer
            prompts = [tokenizer.make_text(PROMPT_TOKENS, f"honest-{i}") for i in range(PROMPTS)]
            for prompt in prompts:  # the honest engine caches each prompt
                reply = await http.post(
                    f"{gateway.url}/v1/completions",
                    json={"model": MODEL, "prompt": prompt, "max_tokens": 1},
                )
                reply.raise_for_status()
            rss_before = _rss_mb(pid)
            quiet = await _route_for(http, gateway.url, prompts, opts.seconds, opts.route_rate, pid)
            for parent, _child in pipes:
                parent.send("go")
            flood = await _route_for(http, gateway.url, prompts, opts.seconds, opts.route_rate, pid)
            offered = 0
            for parent, _child in pipes:
                parent.send("stop")
            for parent, _child in pipes:
                offered += parent.recv() if parent.poll(30) else 0
            counters = await _counters(http, gateway.url)
            after = await _route_for(http, gateway.url, prompts, 2.0, opts.route_rate, pid)
        finally:
            await gateway.stop()
            for (parent, _child), proc in zip(pipes, procs, strict=True):
                stop_child(parent, proc)
    return {
        "mode": mode,
        "rss_before_mb": round(rss_before, 1),
        "rss_after_mb": after["rss_peak_mb"],
        "quiet": quiet,
        "flood": flood,
        "blocks_offered": offered,
        "blocks_offered_per_s": round(offered / opts.seconds),
        "hostile": counters,
        "p99_ratio": round(flood["p99_ms"] / quiet["p99_ms"], 2) if quiet["p99_ms"] else None,
    }


def run(opts: FloodOptions) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvroute-flood-") as tmp:
        runs = [asyncio.run(_one(opts, mode, Path(tmp))) for mode in opts.modes]
    rows = []
    for r in runs:
        h = r["hostile"]
        rows.append(
            [
                r["mode"],
                r["quiet"]["p50_ms"],
                r["quiet"]["p99_ms"],
                r["flood"]["p50_ms"],
                r["flood"]["p99_ms"],
                f"{r['p99_ratio']}×",
                f"{r['flood']['routed_to_honest_prefix']}/{r['flood']['requests']}",
                f"{r['blocks_offered']:,}",
                int(h.get("kvroute_events_applied_total{BlockStored}", 0)),
                int(h.get("kvroute_events_dropped_total{over_budget}", 0)),
                int(h.get("kvroute_source_resets_total{disconnect}", 0)),
                r["rss_before_mb"],
                r["flood"]["rss_peak_mb"],
            ]
        )
    print_table(
        f"kvroute bench flood: /v1/route of an honest engine's prompts ({opts.route_rate:g}/s), "
        f"{opts.seconds:g} s quiet then {opts.seconds:g} s beside {opts.hostile_sources} hostile "
        f"publisher(s) of {opts.frames}"
        + (
            f" ({opts.giant_bytes >> 20} MiB, {opts.giant_per_s:g}/s each)"
            if opts.frames == "giant"
            else f" ({opts.blocks_per_s:,.0f} blocks/s each)"
        ),
        [
            "gateway",
            "quiet p50 ms",
            "quiet p99 ms",
            "flood p50 ms",
            "flood p99 ms",
            "p99 ratio",
            "routed by prefix",
            "blocks offered",
            "hostile events applied",
            "hostile batches refused",
            "hostile disconnects",
            "RSS before MB",
            "RSS peak MB",
        ],
        rows,
    )
    result = {"options": {k: str(v) for k, v in vars(opts).items()}, "runs": runs}
    print(f"wrote {save_json('flood', result, opts.out_dir)}")
    bar_chart(
        opts.out_dir / "flood.png",
        "honest /v1/route beside a hostile publisher",
        [r["mode"] for r in runs],
        [
            ("route p99 during the flood / without (×)", [r["p99_ratio"] or 0 for r in runs]),
            ("gateway RSS peak during the flood (MB)", [r["flood"]["rss_peak_mb"] for r in runs]),
        ],
    )
    return result
