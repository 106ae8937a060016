"""`kvroute bench hostile-client`: normal requests through the gateway without and then beside
hostile clients (huge prompts and bodies, idle and slow connections); p99 and engine health."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx

from kvroute.bench.processes import GatewayProcess, rss_bytes
from kvroute.bench.report import DEFAULT_OUT_DIR, bar_chart, print_table, save_json, stop_child
from kvroute.sim import SimConfig, SimFleet

__all__ = ["HostileClientOptions", "add_arguments", "options", "run"]

MODEL = "sim/hostile-client"
PROMPT_TOKENS = 1024
PROMPTS = 16
KINDS = ("prompts", "bodies", "idle", "slow")


@dataclass(frozen=True)
class HostileClientOptions:
    seconds: float = 20.0  # of normal traffic alone, then as long beside the hostile clients
    rate: float = 20.0  # normal completions per second
    huge_prompts: int = 3  # concurrent requests whose prompt is `prompt_tokens` token ids
    prompt_tokens: int = 10_000_000
    huge_bodies: int = 4  # concurrent uploads of `body_mb` (half declared, half chunked)
    body_mb: int = 100
    idle: int = 2000  # connections that send nothing
    slow: int = 500  # connections that send a header byte a second
    kinds: tuple[str, ...] = KINDS  # which hostile clients run
    out_dir: Path = DEFAULT_OUT_DIR


def add_arguments(p: argparse._ActionsContainer) -> None:
    d = HostileClientOptions()
    p.add_argument(
        "--hostile-seconds",
        type=float,
        default=d.seconds,
        help="seconds of normal traffic alone, then as many beside the hostile clients",
    )
    p.add_argument(
        "--normal-rate",
        type=float,
        default=d.rate,
        help="normal completions per second",
    )
    p.add_argument("--idle-connections", type=int, default=d.idle, help="idle connections")
    p.add_argument(
        "--slow-connections",
        type=int,
        default=d.slow,
        help="slowloris connections, a header byte a second",
    )
    p.add_argument(
        "--hostile-kinds",
        default=",".join(d.kinds),
        help="hostile clients to run, comma-separated, of: prompts (huge token-id prompts), "
        "bodies (100 MB uploads), idle, slow",
    )


def options(args: argparse.Namespace) -> HostileClientOptions:
    if args.hostile_seconds <= 0 or args.normal_rate <= 0:
        raise ValueError("--hostile-seconds, --normal-rate: expected > 0")
    if args.idle_connections < 0 or args.slow_connections < 0:
        raise ValueError("--idle-connections, --slow-connections: expected >= 0")
    kinds = tuple(k for k in str(args.hostile_kinds).split(",") if k)
    if not kinds or set(kinds) - set(KINDS):
        raise ValueError(f"--hostile-kinds: expected some of {', '.join(KINDS)}, got {kinds}")
    return HostileClientOptions(
        kinds=kinds,
        seconds=args.hostile_seconds,
        rate=args.normal_rate,
        idle=args.idle_connections,
        slow=args.slow_connections,
        out_dir=args.out_dir,
    )


# --- the hostile clients, in their own process ------------------------------------------------


async def _huge_prompts(url: str, body: bytes, stats: Counter[str]) -> None:
    async with httpx.AsyncClient(trust_env=False, timeout=120) as http:
        while True:
            try:
                reply = await http.post(
                    f"{url}/v1/completions",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                stats[f"huge_prompt_{reply.status_code}"] += 1
            except httpx.HTTPError as exc:
                stats[f"huge_prompt_{type(exc).__name__}"] += 1


async def _huge_bodies(url: str, size: int, chunked: bool, stats: Counter[str]) -> None:
    chunk = b" " * (1 << 20)
    kind = "chunked" if chunked else "declared"
    whole = b" " * size  # built once: the attacker's CPU is not what is measured

    async def stream() -> Any:
        for _ in range(size >> 20):
            yield chunk

    async with httpx.AsyncClient(trust_env=False, timeout=120) as http:
        while True:
            content: Any = stream() if chunked else whole
            try:
                reply = await http.post(f"{url}/v1/completions", content=content)
                stats[f"body_{kind}_{reply.status_code}"] += 1
            except httpx.HTTPError as exc:
                stats[f"body_{kind}_{type(exc).__name__}"] += 1


async def _idle(host: str, port: int, stats: Counter[str]) -> None:
    """Open a connection, send nothing; open another when the gateway closes it."""
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            stats["idle_connect_failed"] += 1
            await asyncio.sleep(1.0)  # the attacker's own retry pace
            continue
        stats["idle_opened"] += 1
        await reader.read()
        stats["idle_closed_by_gateway"] += 1
        writer.close()


async def _slow(host: str, port: int, stats: Counter[str]) -> None:
    """Send a request's headers one byte a second (slowloris); reconnect when closed."""
    header = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + b"x-slow: " + b"a" * 10_000
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            stats["slow_connect_failed"] += 1
            await asyncio.sleep(1.0)
            continue
        stats["slow_opened"] += 1
        closed = asyncio.ensure_future(reader.read())
        for byte in header:
            if closed.done():
                break
            writer.write(bytes([byte]))
            with contextlib.suppress(OSError):
                await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(closed), 1.0)  # a byte a second
        await closed
        stats["slow_closed_by_gateway"] += 1
        writer.close()


def _hostile(url: str, opts: HostileClientOptions, conn: Connection) -> None:
    """On "go", run every hostile client until "stop"; send back what each saw."""
    host, port = url.removeprefix("http://").split(":")
    ids = b",".join([b"1"] * opts.prompt_tokens)
    body = b'{"model": "' + MODEL.encode() + b'", "max_tokens": 1, "prompt": [' + ids + b"]}"
    del ids
    stats: Counter[str] = Counter()

    async def recv() -> Any:
        """The next message from the bench, without blocking the loop (or a thread)."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(conn.fileno(), ready.set)
        try:
            await ready.wait()
        finally:
            loop.remove_reader(conn.fileno())
        return conn.recv()

    async def main() -> None:
        conn.send("ready")
        await recv()  # "go"
        counts = {
            "prompts": opts.huge_prompts,
            "bodies": opts.huge_bodies,
            "idle": opts.idle,
            "slow": opts.slow,
        }
        n = {k: (v if k in opts.kinds else 0) for k, v in counts.items()}
        tasks = [asyncio.create_task(_huge_prompts(url, body, stats)) for _ in range(n["prompts"])]
        tasks += [
            asyncio.create_task(_huge_bodies(url, opts.body_mb << 20, i % 2 == 1, stats))
            for i in range(n["bodies"])
        ]
        tasks += [asyncio.create_task(_idle(host, int(port), stats)) for _ in range(n["idle"])]
        tasks += [asyncio.create_task(_slow(host, int(port), stats)) for _ in range(n["slow"])]
        await recv()  # "stop"
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run(main())
    finally:
        conn.send(dict(stats))


# --- measuring ----------------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    return rss_bytes(pid, children=True) / 2**20


async def _normal(
    http: httpx.AsyncClient, url: str, prompts: list[str], opts: HostileClientOptions, pid: int
) -> dict[str, Any]:
    """Completions of the normal prompts at `opts.rate` for `opts.seconds`, each sent on time
    (not after the previous answer), while engine health and RSS are sampled."""
    latencies: list[float] = []
    statuses: Counter[int | str] = Counter()
    unhealthy: set[str] = set()
    rss_peak = 0.0

    async def one(i: int) -> None:
        body = {"model": MODEL, "prompt": prompts[i % len(prompts)], "max_tokens": 4}
        sent = time.perf_counter()
        try:
            reply = await http.post(f"{url}/v1/completions", json=body)
            statuses[reply.status_code] += 1
        except httpx.HTTPError as exc:
            statuses[type(exc).__name__] += 1
        latencies.append(time.perf_counter() - sent)

    async def watch() -> None:
        nonlocal rss_peak
        while True:
            with contextlib.suppress(httpx.HTTPError):
                for engine in (await http.get(f"{url}/debug/engines")).json()["engines"]:
                    if not engine["healthy"]:
                        unhealthy.add(engine["name"])
            rss_peak = max(rss_peak, _rss_mb(pid))
            await asyncio.sleep(0.5)  # sampling period

    watcher = asyncio.create_task(watch())
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent: list[asyncio.Task[None]] = []
    # A fixed count, each at its slot or as soon after as the loop allows: a busy host sends the
    # last ones late rather than fewer of them (a phase's count is part of its report).
    for i in range(max(1, round(opts.seconds * opts.rate))):
        # Pacing of the load generator (not a synchronisation): this request's slot.
        await asyncio.sleep(max(0.0, start + i / opts.rate - loop.time()))
        sent.append(asyncio.create_task(one(i)))
    await asyncio.gather(*sent)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    ms = sorted(x * 1000 for x in latencies)
    return {
        "requests": len(ms),
        "statuses": {str(k): v for k, v in statuses.items()},
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2),
        "max_ms": round(ms[-1], 2),
        "engines_ejected": sorted(unhealthy),
        "rss_peak_mb": round(rss_peak, 1),
    }


async def _run(opts: HostileClientOptions, workdir: Path) -> dict[str, Any]:
    async with (
        SimFleet(2, MODEL, config=SimConfig(speed=20.0), name_prefix="engine") as fleet,
        httpx.AsyncClient(
            trust_env=False, timeout=60, limits=httpx.Limits(max_connections=200)
        ) as http,
    ):
        fleet_file = workdir / "fleet.yaml"
        fleet.write_fleet_file(fleet_file)
        gateway = GatewayProcess(0, workdir)
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = None
        try:
            await gateway.start(fleet_file, {})
            await gateway.wait_ready(http)
            assert gateway.proc is not None
            pid = gateway.proc.pid
            proc = ctx.Process(target=_hostile, args=(gateway.url, opts, child), daemon=True)
            proc.start()
            if not parent.poll(120) or parent.recv() != "ready":
                raise RuntimeError("the hostile clients did not start")
            prompts = [
                fleet.tokenizer.make_text(PROMPT_TOKENS, f"normal-{i}") for i in range(PROMPTS)
            ]
            for prompt in prompts:  # cached before either phase: both measure the same mix
                reply = await http.post(
                    f"{gateway.url}/v1/completions",
                    json={"model": MODEL, "prompt": prompt, "max_tokens": 4},
                )
                reply.raise_for_status()
            quiet = await _normal(http, gateway.url, prompts, opts, pid)
            parent.send("go")
            hostile = await _normal(http, gateway.url, prompts, opts, pid)
            parent.send("stop")
            seen = parent.recv() if parent.poll(60) else {}
            metrics = (await http.get(f"{gateway.url}/metrics")).text
        finally:
            await gateway.stop()
            if proc is not None:
                stop_child(parent, proc)
    timeouts = {
        line.split("=")[1].split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("kvroute_http_timeouts_total{")
    }
    offloaded = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("kvroute_prompts_offloaded_total ")
    ]
    return {
        "quiet": quiet,
        "hostile": hostile,
        "hostile_clients": seen,
        "http_timeouts": timeouts,
        "prompts_offloaded": offloaded[0] if offloaded else 0,
        "p99_ratio": round(hostile["p99_ms"] / quiet["p99_ms"], 2) if quiet["p99_ms"] else None,
    }


def _describe(opts: HostileClientOptions) -> str:
    parts = {
        "prompts": f"{opts.huge_prompts} concurrent {opts.prompt_tokens:,}-token prompts",
        "bodies": f"{opts.huge_bodies} concurrent {opts.body_mb} MB bodies",
        "idle": f"{opts.idle} idle connections",
        "slow": f"{opts.slow} slow connections",
    }
    return ", ".join(parts[k] for k in opts.kinds)


def run(opts: HostileClientOptions) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvroute-hostile-") as tmp:
        r = asyncio.run(_run(opts, Path(tmp)))
    q, h = r["quiet"], r["hostile"]
    errors = sum(v for k, v in h["statuses"].items() if k != "200")
    print_table(
        f"kvroute bench hostile-client: normal completions ({opts.rate:g}/s, {PROMPT_TOKENS}-token "
        f"prompts), {opts.seconds:g} s alone then {opts.seconds:g} s beside hostile clients: "
        + _describe(opts),
        [
            "phase",
            "requests",
            "non-200",
            "p50 ms",
            "p99 ms",
            "max ms",
            "engines ejected",
            "gateway RSS peak MB",
        ],
        [
            [
                "alone",
                q["requests"],
                0,
                q["p50_ms"],
                q["p99_ms"],
                q["max_ms"],
                "-",
                q["rss_peak_mb"],
            ],
            [
                "beside hostile clients",
                h["requests"],
                errors,
                h["p50_ms"],
                h["p99_ms"],
                h["max_ms"],
                ", ".join(h["engines_ejected"]) or "none",
                h["rss_peak_mb"],
            ],
        ],
    )
    print(f"p99 ratio: {r['p99_ratio']}×; hostile clients saw: {r['hostile_clients']}")
    print(f"gateway: timeouts {r['http_timeouts']}, bodies offloaded {r['prompts_offloaded']:g}")
    result = {"options": {k: str(v) for k, v in vars(opts).items()}, **r}
    print(f"wrote {save_json('hostile_client', result, opts.out_dir)}")
    bar_chart(
        opts.out_dir / "hostile_client.png",
        "normal completions beside hostile clients",
        ["alone", "beside hostile clients"],
        [
            ("p99 ms", [q["p99_ms"], h["p99_ms"]]),
            ("gateway RSS peak MB", [q["rss_peak_mb"], h["rss_peak_mb"]]),
        ],
    )
    return result
