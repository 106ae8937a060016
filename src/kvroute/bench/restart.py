"""`kvroute bench restart`: a gateway killed with SIGKILL under load, restarted warm (from its
snapshot) and cold; time to ready, held prefixes recovered, and blocks claimed but not held."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kvroute.bench.processes import READY_TIMEOUT_S, GatewayProcess
from kvroute.bench.report import DEFAULT_OUT_DIR, bar_chart, print_table, save_json
from kvroute.core import source_id
from kvroute.gateway import BackgroundServer, Gateway, create_app
from kvroute.metrics import Metrics
from kvroute.persist.index_snapshot import load_sources
from kvroute.settings import load_settings
from kvroute.sim import SimConfig, SimFleet
from kvroute.sim.tokenizer import SimTokenizer

__all__ = ["RestartOptions", "add_arguments", "options", "run"]

MODEL = "sim/restart"
FILL_PROMPT_TOKENS = 8192


@dataclass(frozen=True)
class RestartOptions:
    engines: int = 4
    gpu_blocks: int = 4096
    warmup_requests: int = 400
    groups: int = 120  # shared prefixes of the warm-up
    down_s: float = 1.0  # how long no gateway runs
    # Batches an engine keeps for replay. vLLM keeps its last `buffer_steps` (10,000 by
    # default); an engine that has run for hours has published far more, so a cold start's
    # bootstrap sees only its recent past. A small buffer here plays that.
    buffer_steps: int = 20
    # Blocks each engine caches before the warm-up, from long unique prompts sent straight to
    # it (the first gateway ingests their events): how the index is made big.
    fill_blocks: int = 0
    out_dir: Path = DEFAULT_OUT_DIR


def add_arguments(p: argparse._ActionsContainer) -> None:
    d = RestartOptions()
    p.add_argument("--gpu-blocks", type=int, default=d.gpu_blocks, help="KV blocks per engine")
    p.add_argument(
        "--warmup-requests",
        type=int,
        default=d.warmup_requests,
        help="requests through the first gateway before it is killed",
    )
    p.add_argument("--down-s", type=float, default=d.down_s, help="seconds with no gateway running")
    p.add_argument(
        "--buffer-steps",
        type=int,
        default=d.buffer_steps,
        help="batches each simulated engine keeps for replay",
    )
    p.add_argument(
        "--fill-blocks",
        type=int,
        default=d.fill_blocks,
        help="blocks each engine caches from unique prompts before the warm-up, to measure a "
        "big index (keep below --gpu-blocks)",
    )


def options(args: argparse.Namespace) -> RestartOptions:
    return RestartOptions(
        gpu_blocks=args.gpu_blocks,
        warmup_requests=args.warmup_requests,
        down_s=args.down_s,
        buffer_steps=args.buffer_steps,
        fill_blocks=args.fill_blocks,
        out_dir=args.out_dir,
    )


def _prompt(rng: random.Random, groups: int) -> str:
    g = rng.randrange(groups)
    return f"system prompt of group {g}: " + f"rule {g} " * 120 + f" question {rng.random()}"


async def _fill(urls: list[str], blocks: int, block_size: int) -> None:
    """Make every engine cache about `blocks` blocks of unique prompts (4 requests at a time
    per engine, straight to it)."""
    per_prompt = FILL_PROMPT_TOKENS // block_size
    tokenizer = SimTokenizer()

    async def engine(http: httpx.AsyncClient, i: int, url: str) -> None:
        todo = list(range(-(-blocks // per_prompt)))
        while todo:
            batch, todo = todo[:4], todo[4:]
            replies = await asyncio.gather(
                *(
                    http.post(
                        f"{url}/v1/completions",
                        json={
                            "model": MODEL,
                            "prompt": tokenizer.make_text(FILL_PROMPT_TOKENS, f"fill-{i}-{n}"),
                            "max_tokens": 1,
                        },
                    )
                    for n in batch
                )
            )
            for reply in replies:
                reply.raise_for_status()

    async with httpx.AsyncClient(trust_env=False, timeout=120) as http:
        await asyncio.gather(*(engine(http, i, url) for i, url in enumerate(urls)))


async def _load(urls: list[str], rng: random.Random, groups: int, stop: asyncio.Event) -> int:
    """Requests straight to the engines (round robin), 4 at a time, until `stop`: the pools
    keep storing and evicting while no gateway runs and while the next one starts."""
    sent = 0

    async def one(http: httpx.AsyncClient, url: str) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await http.post(
                f"{url}/v1/completions",
                json={"model": MODEL, "prompt": _prompt(rng, groups), "max_tokens": 4},
            )

    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        while not stop.is_set():
            await asyncio.gather(*(one(http, urls[(sent + i) % len(urls)]) for i in range(4)))
            sent += 4
    return sent


def _claimed(gateway: Gateway, sid: str) -> set[int]:
    index = gateway.index
    assert index is not None
    export = index.export_source(sid)  # type: ignore[arg-type]
    if export is None or index.is_stale(sid):  # type: ignore[arg-type]
        return set()  # a stale source's blocks count for nothing
    p = export.pairs
    return {struct.unpack_from("<Q", p, i)[0] for i in range(0, len(p), 16)}


async def _measure(
    fleet: SimFleet, fleet_file: Path, snapshot: Path | None, groups: int
) -> dict[str, Any]:
    """Start a gateway (warm when `snapshot`), time it to ready, stop the load, let every
    source catch up with its engine, and compare what it claims with the pools."""
    rng = random.Random(7)
    stop = asyncio.Event()
    # The load during the restart touches a few prefixes; the pools still hold the others,
    # stored long before: what a cold start's short replay buffer no longer reaches.
    load = asyncio.create_task(_load([e.url for e in fleet.engines], rng, 4, stop))
    settings = load_settings(
        fleet_file=fleet_file,
        port=0,
        log_level="warning",
        snapshot_path=snapshot,
        snapshot_interval_s=0,
    )
    restored = 0
    if snapshot is not None:
        restored = sum(r.export.blocks for r in load_sources(snapshot, fleet="default"))
    started = time.perf_counter()
    app = create_app(settings, metrics=Metrics())
    async with (
        BackgroundServer(app) as server,
        httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=30) as http,
    ):
        while (await http.get("/readyz")).status_code != 200:
            if time.perf_counter() - started > READY_TIMEOUT_S:
                raise RuntimeError("the restarted gateway never became ready")
            await asyncio.sleep(0.02)
        ready_s = time.perf_counter() - started
        gateway: Gateway = app.state.gateway
        stop.set()
        await load
        assert gateway.subscribers is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:  # every source has applied its engine's last batch
            last = {s.source: s.last_seq for s in gateway.subscribers.status()}
            if all(
                last.get(source_id(e.name, 0)) == e.state()["ranks"][0]["seq"]
                for e in fleet.engines
            ):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("sources never caught up with their engines")
            await asyncio.sleep(0.02)
        per_engine = []
        wrong = held_total = 0
        for e in fleet.engines:
            held = {int(b["hash"]) for b in e.state()["ranks"][0]["cached"]}
            claimed = _claimed(gateway, source_id(e.name, 0))
            wrong += len(claimed - held)
            held_total += len(held)
            per_engine.append(len(claimed & held) / len(held) if held else 1.0)
        resets = gateway.metrics.event_counters.resets
        unconfirmed = sum(n for (_s, cause), n in resets.items() if cause == "unconfirmed")
    return {
        "time_to_ready_s": round(ready_s, 3),
        "restored_blocks": restored,
        "held_blocks": held_total,
        "recovered_fraction_mean": round(sum(per_engine) / len(per_engine), 4),
        "recovered_fraction_min": round(min(per_engine), 4),
        "claimed_not_held": wrong,
        "unconfirmed_resets": unconfirmed,
    }


async def _run(opts: RestartOptions) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="kvroute-restart-"))
    try:
        config = SimConfig(
            speed=20.0, num_gpu_blocks=opts.gpu_blocks, buffer_steps=opts.buffer_steps
        )
        async with SimFleet(opts.engines, MODEL, config=config) as fleet:
            fleet_file = workdir / "fleet.yaml"
            fleet.write_fleet_file(fleet_file)
            snapshot = workdir / "index.snap"
            first = GatewayProcess(0, workdir)
            await first.start(
                fleet_file, {"snapshot_path": str(snapshot), "snapshot_interval_s": "0.5"}
            )
            rng = random.Random(1)
            async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
                await first.wait_ready(http)
                if opts.fill_blocks:
                    filling = time.perf_counter()
                    await _fill([e.url for e in fleet.engines], opts.fill_blocks, config.block_size)
                    print(f"filled in {time.perf_counter() - filling:.1f} s", flush=True)
                for start in range(0, opts.warmup_requests, 8):
                    await asyncio.gather(
                        *(
                            http.post(
                                f"{first.url}/v1/completions",
                                json={
                                    "model": MODEL,
                                    "prompt": _prompt(rng, opts.groups),
                                    "max_tokens": 4,
                                },
                            )
                            for _ in range(min(8, opts.warmup_requests - start))
                        )
                    )
            written = snapshot.stat().st_mtime if snapshot.exists() else 0.0
            while not snapshot.exists() or snapshot.stat().st_mtime <= written:
                await asyncio.sleep(0.05)  # one more periodic snapshot after the warm-up
            await first.stop(kill=True)  # SIGKILL: no shutdown snapshot
            await asyncio.sleep(opts.down_s)  # the engines go on without a gateway
            warm = await _measure(fleet, fleet_file, snapshot, opts.groups)
            cold = await _measure(fleet, fleet_file, None, opts.groups)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {"options": {k: str(v) for k, v in vars(opts).items()}, "warm": warm, "cold": cold}
    rows = [[mode, *(str(result[mode][k]) for k in warm)] for mode in ("warm", "cold")]
    print_table("gateway restart after SIGKILL under load", ["restart", *warm], rows)
    print(f"wrote {save_json('restart', result, opts.out_dir)}")
    modes = ("warm", "cold")
    bar_chart(
        opts.out_dir / "restart.png",
        f"gateway restart after SIGKILL under load ({opts.engines} engines, "
        f"{warm['held_blocks']:,} blocks held)",
        modes,
        [
            ("time to ready (s)", [result[m]["time_to_ready_s"] for m in modes]),
            (
                "held blocks recovered, mean over engines (%)",
                [100 * result[m]["recovered_fraction_mean"] for m in modes],
            ),
            ("blocks claimed but not held", [result[m]["claimed_not_held"] for m in modes]),
        ],
    )
    return result


def run(opts: RestartOptions) -> dict[str, Any]:
    return asyncio.run(_run(opts))
