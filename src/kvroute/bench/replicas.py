"""`kvroute bench replicas`: the demo workload through one gateway and through several behind a
round-robin client, by load source and shared store; table on stdout, JSON in bench-results/."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvroute.bench.demo import (
    MODEL,
    DemoOptions,
    PolicyResult,
    RequestRecord,
    _measure_capacity,
    _summarise,
    add_population_arguments,
    request_record,
)
from kvroute.bench.processes import READY_TIMEOUT_S, ChildProcess, GatewayProcess, free_port
from kvroute.bench.report import DEFAULT_OUT_DIR, bar_chart, print_table, save_json
from kvroute.bench.trace import TRACE_SPEED
from kvroute.bench.workload import ChatTurn, ChatWorkload, ChatWorkloadSpec, poisson_arrivals
from kvroute.core import LoadSource
from kvroute.errors import ConfigError
from kvroute.settings import load_settings
from kvroute.sim import SimConfig, SimFleet

__all__ = ["PHASES", "Phase", "ReplicasOptions", "add_arguments", "run", "run_async"]

HIT_RATE_POINTS = 2.0  # several replicas' hit rate within this many points of one replica's
TTFT_P90_TOLERANCE = 0.2  # and their TTFT p90 within this fraction of it


@dataclass(frozen=True)
class Phase:
    """One run of the workload: how many replicas, what load they route by, the store."""

    key: str
    name: str
    replicas: int
    load_source: LoadSource
    shared: bool = False
    kill_store: bool = False  # kill the store at 1/3 of the requests, restart it at 2/3


def _phases(n: int) -> tuple[Phase, ...]:
    return (
        Phase("one", "1 replica", 1, LoadSource.LOCAL),
        Phase("one-blended", "1 replica, blended", 1, LoadSource.BLENDED),
        Phase("local", f"{n} replicas, local load", n, LoadSource.LOCAL),
        Phase("blended", f"{n} replicas, blended", n, LoadSource.BLENDED),
        Phase("local-shared", f"{n} replicas, local + shared", n, LoadSource.LOCAL, shared=True),
        Phase("shared", f"{n} replicas, blended + shared", n, LoadSource.BLENDED, shared=True),
        Phase(
            "killed",
            f"{n} replicas, shared, store killed",
            n,
            LoadSource.LOCAL,
            shared=True,
            kill_store=True,
        ),
    )


PHASES = _phases(3)
DEFAULT_PHASES = ("one", "local", "blended", "local-shared", "shared", "killed")


@dataclass(frozen=True)
class ReplicasOptions:
    replicas: int = 3
    phases: tuple[str, ...] = DEFAULT_PHASES
    demo: DemoOptions = field(default_factory=DemoOptions)
    shared_state_url: str | None = None  # None: start a redis-server of our own
    out_dir: Path = DEFAULT_OUT_DIR
    check: bool = True
    repeat: int = 1  # runs of each phase, interleaved; results pooled over them
    router_settings: tuple[tuple[str, str], ...] = ()  # NAME=VALUE for every replica


@dataclass
class PhaseResult:
    phase: Phase
    result: PolicyResult  # pooled over the repeats
    runs: list[PolicyResult]  # each repeat alone
    store: dict[str, float]  # shared store counters summed over the replicas and repeats
    store_events: list[str]

    @property
    def hit_rate(self) -> float:
        """The median run's hit rate: one run in which the fleet tipped over (queues grow,
        users lose their engine, more queues) moves a pooled figure by itself."""
        return statistics.median(r.hit_rate for r in self.runs)

    @property
    def ttft_p90_ms(self) -> float:
        """The median of the runs' TTFT p90s."""
        return statistics.median(r.ttft_p90_ms for r in self.runs)


def add_arguments(parser: Any) -> None:
    """`kvroute bench replicas` flags on `parser` (an argparse parser or argument group)."""
    parser.add_argument(
        "--replicas", type=int, default=3, help="replicas in the several-replica runs"
    )
    parser.add_argument(
        "--phases",
        default=",".join(DEFAULT_PHASES),
        help="comma-separated runs, of: " + ", ".join(p.key for p in PHASES),
    )
    parser.add_argument(
        "--shared-state-url",
        help="Redis or Valkey for the shared phases (default: a redis-server started here)",
    )
    parser.add_argument(
        "--speed",
        type=float,
        help="simulated seconds per wall second (default: "
        f"{DemoOptions.speed:g} for replicas, {TRACE_SPEED:g} for trace)",
    )
    parser.add_argument(
        "--load",
        type=float,
        default=DemoOptions.load,
        help="arrivals as a fraction of round-robin capacity",
    )
    add_population_arguments(parser)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each phase, interleaved; hit rate and TTFT pooled over them",
    )
    parser.add_argument(
        "--replica-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a gateway setting for every replica of every run (repeatable), e.g. "
        "scrape_interval_s=0.25 (default: none)",
    )
    parser.add_argument(
        "--no-check", action="store_true", help="exit 0 even when the thresholds are missed"
    )


def _options(args: argparse.Namespace) -> ReplicasOptions:
    keys = tuple(k.strip() for k in str(args.phases).split(",") if k.strip())
    known = {p.key for p in PHASES}
    unknown = [k for k in keys if k not in known]
    if unknown or not keys:
        raise ValueError(f"--phases: expected some of {', '.join(sorted(known))}, got {unknown}")
    if args.replicas < 2:
        raise ValueError(f"--replicas: expected >= 2, got {args.replicas}")
    if args.repeat < 1:
        raise ValueError(f"--repeat: expected >= 1, got {args.repeat}")
    settings = []
    for item in args.replica_setting:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--replica-setting: expected NAME=VALUE, got {item!r}")
        settings.append((name, value))
    load_settings(**dict(settings))  # a bad name or value is reported before anything starts
    spec = ChatWorkloadSpec(groups=args.groups, users_per_group=args.users_per_group)
    speed = DemoOptions.speed if args.speed is None else args.speed
    demo = DemoOptions(speed=speed, load=args.load, out_dir=args.out_dir, workload=spec)
    return ReplicasOptions(
        replicas=args.replicas,
        phases=keys,
        demo=demo,
        shared_state_url=args.shared_state_url,
        out_dir=args.out_dir,
        check=not args.no_check,
        repeat=args.repeat,
        router_settings=tuple(settings),
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of `kvroute bench replicas`; the exit code says whether the proof held."""
    try:
        options = _options(args)
    except (ValueError, ConfigError) as exc:
        print(f"kvroute bench replicas: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(run_async(options))


# --- processes: gateway replicas and the store -----------------------------------------------


class _Store(ChildProcess):
    """A redis-server of our own on a fixed port: killed (SIGKILL) and restarted mid-run."""

    def __init__(self, binary: str, workdir: Path) -> None:
        super().__init__("redis-server", workdir / "redis.log")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port(below_ephemeral=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        await self.spawn(
            [
                self.binary,
                *("--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "no", "--dir", str(self.workdir)),
            ]
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.exited():
                raise RuntimeError(f"redis-server exited: {self.tail()}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                await writer.wait_closed()
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not listen: {self.tail()}")
            await asyncio.sleep(0.05)


# --- one phase -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _phase_stack(
    options: ReplicasOptions, phase: Phase, workdir: Path, store_url: str | None
) -> AsyncIterator[tuple[SimFleet, list[GatewayProcess], httpx.AsyncClient]]:
    """A fresh simulated fleet (cold caches) and `phase.replicas` fresh gateways."""
    demo = options.demo
    fleet = SimFleet(
        demo.engines, MODEL, config=SimConfig(num_gpu_blocks=demo.num_gpu_blocks, speed=demo.speed)
    )
    replicas = [GatewayProcess(i, workdir) for i in range(phase.replicas)]
    # Idle connections expire on our side before uvicorn's 5 s keep-alive (no reset races).
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000, keepalive_expiry=1)
    async with fleet, httpx.AsyncClient(timeout=300.0, trust_env=False, limits=limits) as http:
        fleet_file = workdir / f"fleet-{phase.key}.yaml"
        fleet.write_fleet_file(fleet_file)
        settings = {**dict(options.router_settings), "load_source": phase.load_source.value}
        if phase.shared:
            assert store_url is not None
            settings["shared_state_url"] = store_url
            settings["shared_state_key_prefix"] = f"kvroute-bench-{os.getpid()}-{phase.key}"
        try:
            for r in replicas:
                await r.start(fleet_file, settings)
            for r in replicas:
                await r.wait_ready(http)
            yield fleet, replicas, http
        finally:
            for r in replicas:
                await r.stop()


async def _drive(
    http: httpx.AsyncClient,
    urls: Sequence[str],
    workload: ChatWorkload,
    arrivals_wall: Sequence[float],
    on_sent: Callable[[int], None],
    failures: list[str] | None = None,
) -> list[RequestRecord]:
    """Send the workload's turns at their arrival offsets, each to the next replica in turn
    (round robin in send order); a user's next turn never before its previous answer."""
    turns = workload.turns
    answer_tokens = workload.spec.answer_tokens
    history: dict[int, list[dict[str, Any]]] = {}
    answered = {(t.user, t.turn): asyncio.Event() for t in turns}
    records: list[RequestRecord] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0

    async def one(turn: ChatTurn, at: float) -> None:
        nonlocal sent
        delay = start + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        previous = answered.get((turn.user, turn.turn - 1))
        if previous is not None:
            await previous.wait()
        messages = workload.messages(turn, history.get(turn.user))
        url = urls[sent % len(urls)]
        sent += 1
        on_sent(sent)
        sent_s = loop.time() - start
        body = {"model": MODEL, "messages": messages, "max_tokens": answer_tokens}
        response: httpx.Response | None = None
        data: dict[str, Any] = {}
        try:
            response = await http.post(f"{url}/v1/chat/completions", json=body)
            status = response.status_code
            data = response.json() if status == 200 else {}
            if status != 200 and failures is not None:
                failures.append(f"{url}: HTTP {status}: {response.text[:300]}")
        except (httpx.HTTPError, ValueError) as exc:
            status = 0
            if failures is not None:
                failures.append(f"{url}: {type(exc).__name__}: {exc!r}")
        answer = ""
        if status == 200:
            try:
                answer = str(data["choices"][0]["message"]["content"] or "")
            except (KeyError, IndexError, TypeError):
                status = -1
        history.setdefault(turn.user, []).extend(
            [{"role": "user", "content": turn.question}, {"role": "assistant", "content": answer}]
        )
        records.append(request_record(turn, response, status, data, sent_s, loop.time() - start))
        answered[(turn.user, turn.turn)].set()

    await asyncio.gather(*(one(t, at) for t, at in zip(turns, arrivals_wall, strict=True)))
    return records


async def _store_counters(
    http: httpx.AsyncClient, replicas: Sequence[GatewayProcess]
) -> dict[str, float]:
    """The replicas' shared-store counters, summed (and each label kept apart)."""
    totals: dict[str, float] = {}
    for r in replicas:
        with contextlib.suppress(httpx.HTTPError):
            text = (await http.get(f"{r.url}/metrics")).text
            for family in text_string_to_metric_families(text):
                if not family.name.startswith("kvroute_shared_"):
                    continue
                for sample in family.samples:
                    if sample.name.endswith("_created"):
                        continue
                    label = ",".join(f"{v}" for v in sample.labels.values())
                    key = sample.name + (f"{{{label}}}" if label else "")
                    totals[key] = totals.get(key, 0.0) + sample.value
    return totals


async def _run_phase(
    options: ReplicasOptions,
    phase: Phase,
    workload: ChatWorkload,
    arrivals_wall: Sequence[float],
    workdir: Path,
    store: _Store | None,
    store_url: str | None,
) -> _Run:
    events: list[str] = []
    total = len(workload.turns)
    tasks: list[asyncio.Task[None]] = []
    started = time.monotonic()

    def note(text: str) -> None:
        events.append(f"{time.monotonic() - started:.1f} s: {text}")
        print(f"  {events[-1]}", flush=True)

    async def kill() -> None:
        assert store is not None
        await store.stop(kill=True)
        note("store killed (SIGKILL)")

    async def restart() -> None:
        assert store is not None
        await store.start()
        note("store restarted on the same port")

    def on_sent(n: int) -> None:
        if not phase.kill_store or store is None:
            return
        if n == total // 3:
            tasks.append(asyncio.create_task(kill()))
        elif n == (2 * total) // 3:
            tasks.append(asyncio.create_task(restart()))

    async with _phase_stack(options, phase, workdir, store_url) as (fleet, replicas, http):
        note(f"{phase.name}: {len(replicas)} replica(s) ready")
        sim_start = fleet.engines[0].sim_now()
        failures: list[str] = []
        urls = [r.url for r in replicas]
        records = await _drive(http, urls, workload, arrivals_wall, on_sent, failures)
        for failure in failures:
            note(f"client error: {failure}")
        await asyncio.gather(*tasks)
        sim_span = max(r.scheduler.clock for e in fleet.engines for r in e.all_ranks()) - sim_start
        counters = await _store_counters(http, replicas) if phase.shared else {}
    result = _summarise(phase.name, records, sim_span, options.demo)
    failed = Counter(r.status for r in records if r.status != 200)
    note(
        f"hit rate {result.hit_rate:.1%}, TTFT p90 {result.ttft_p90_ms:.0f} ms, "
        f"{result.errors} errors"
        + (f" (status {dict(failed)}; 0: connection error)" if failed else "")
    )
    return _Run(records, sim_span, result, counters, events)


@dataclass
class _Run:
    records: list[RequestRecord]
    sim_span: float
    result: PolicyResult
    store: dict[str, float]
    events: list[str]


def _pooled(options: ReplicasOptions, phase: Phase, runs: Sequence[_Run]) -> PhaseResult:
    """One result over every repeat's requests (hit rate and percentiles over all of them)."""
    records = [r for run in runs for r in run.records]
    span = sum(run.sim_span for run in runs)
    pooled = _summarise(phase.name, records, span, options.demo)
    store: dict[str, float] = {}
    for run in runs:
        for key, value in run.store.items():
            store[key] = store.get(key, 0.0) + value
    events = [e for i, run in enumerate(runs) for e in (f"run {i + 1}: {x}" for x in run.events)]
    return PhaseResult(phase, pooled, [run.result for run in runs], store, events)


# --- the whole benchmark -------------------------------------------------------------------------


async def run_async(options: ReplicasOptions) -> int:
    started = time.perf_counter()
    phases = [p for p in _phases(options.replicas) if p.key in options.phases]
    workload = ChatWorkload(options.demo.workload)
    print(
        f"kvroute bench replicas: {options.demo.engines} simulated engines, "
        f"{len(workload.turns)} chat requests, sim speed ×{options.demo.speed:g}; phases: "
        + ", ".join(p.name for p in phases),
        flush=True,
    )
    capacity = await _measure_capacity(options.demo, workload)
    rate = options.demo.load * capacity
    arrivals_wall = [
        t / options.demo.speed
        for t in poisson_arrivals(len(workload.turns), rate, seed=options.demo.workload.seed)
    ]
    print(
        f"capacity under round robin {capacity:.2f} req/s (simulated); arrivals at "
        f"{options.demo.load:.0%}: {rate:.2f} req/s",
        flush=True,
    )
    results: list[PhaseResult] = []
    with tempfile.TemporaryDirectory(prefix="kvroute-replicas-") as tmp:
        workdir = Path(tmp)
        store: _Store | None = None
        store_url = options.shared_state_url
        try:
            if any(p.shared for p in phases) and store_url is None:
                binary = shutil.which("redis-server") or shutil.which("valkey-server")
                if binary is None:
                    print("no redis-server or valkey-server: shared phases skipped", flush=True)
                    phases = [p for p in phases if not p.shared]
                else:
                    store = _Store(binary, workdir)
                    await store.start()
                    store_url = store.url
            if store is None:  # someone else's store: never killed
                phases = [p for p in phases if not p.kill_store]
            runs: dict[str, list[_Run]] = {p.key: [] for p in phases}
            for _ in range(options.repeat):  # interleaved, so drift hits every phase alike
                for phase in phases:
                    if store is not None and store.exited():
                        await store.start()
                    runs[phase.key].append(
                        await _run_phase(
                            options, phase, workload, arrivals_wall, workdir, store, store_url
                        )
                    )
            results = [_pooled(options, p, runs[p.key]) for p in phases]
        finally:
            if store is not None:
                await store.stop()
    elapsed = time.perf_counter() - started
    return _report(options, results, workload, capacity, rate, elapsed)


def _report(
    options: ReplicasOptions,
    results: Sequence[PhaseResult],
    workload: ChatWorkload,
    capacity: float,
    rate: float,
    elapsed: float,
) -> int:
    base = next((r for r in results if r.phase.replicas == 1), None)
    rows = []
    for r in results:
        res = r.result
        delta = 100 * (r.hit_rate - base.hit_rate) if base is not None else float("nan")
        ratio = r.ttft_p90_ms / base.ttft_p90_ms if base is not None else float("nan")
        spread = ""
        if len(r.runs) > 1:
            lo = min(x.ttft_p90_ms for x in r.runs)
            hi = max(x.ttft_p90_ms for x in r.runs)
            spread = f" ({lo:.0f}–{hi:.0f})"
        rows.append(
            [
                r.phase.name,
                f"{r.hit_rate:.1%}",
                f"{delta:+.1f}",
                res.ttft_p50_ms,
                f"{r.ttft_p90_ms:.1f}{spread}",
                f"{ratio:.2f}×",
                f"{res.load_max_over_mean:.2f}",
                res.errors,
                int(sum(v for k, v in r.store.items() if k.startswith("kvroute_shared_state_err"))),
            ]
        )
    print_table(
        "kvroute bench replicas: hit rate and TTFT p90 (simulated ms) of the median run "
        "(range over runs), TTFT p50 and load pooled, errors",
        [
            "run",
            "hit rate",
            "Δ points",
            "TTFT p50",
            "TTFT p90",
            "p90 vs 1",
            "max/mean",
            "client errors",
            "store errors",
        ],
        rows,
    )
    verdicts, ok = _verdicts(results, base)
    for line in verdicts:
        print(line)
    data = {
        "runs": [
            {
                **r.result.summary(),
                "median_run": {"hit_rate": r.hit_rate, "ttft_p90_ms": r.ttft_p90_ms},
                "replicas": r.phase.replicas,
                "load_source": r.phase.load_source.value,
                "shared_state": r.phase.shared,
                "store_killed": r.phase.kill_store,
                "store_counters": r.store,
                "store_events": r.store_events,
                "each_run": [
                    {k: v for k, v in x.summary().items() if k != "policy"} for x in r.runs
                ],
            }
            for r in results
        ],
        "workload": {
            **workload.describe(),
            "engines": options.demo.engines,
            "num_gpu_blocks": options.demo.num_gpu_blocks,
            "sim_speed": options.demo.speed,
            "capacity_req_s": round(capacity, 3),
            "load_fraction": options.demo.load,
            "arrival_rate_req_s": round(rate, 3),
            "client": "round robin over the replicas, in send order",
            "replicas_as": "one `kvroute serve` process each, default settings but load_source",
            "replica_settings": dict(options.router_settings),
            "repeat": options.repeat,
            "wall_seconds": round(elapsed, 1),
        },
        "thresholds": {
            "hit_rate_points": HIT_RATE_POINTS,
            "ttft_p90_tolerance": TTFT_P90_TOLERANCE,
            "verdicts": verdicts,
            "met": ok,
        },
    }
    path = save_json("replicas", data, options.out_dir)
    print(f"wrote {path}")
    names = [r.phase.name for r in results]
    bar_chart(
        options.out_dir / "replicas.png",
        f"one gateway vs {options.replicas} behind a round-robin client "
        f"({options.demo.engines} simulated engines, {rate:.1f} req/s)",
        names,
        [
            ("prefix hit rate, median run (%)", [100 * r.hit_rate for r in results]),
            ("TTFT p90, median run (ms, simulated)", [r.ttft_p90_ms for r in results]),
            ("max/mean requests per engine", [r.result.load_max_over_mean for r in results]),
        ],
    )
    print(f"bench replicas finished in {elapsed:.0f} s")
    return 0 if ok or not options.check else 1


def _verdicts(results: Sequence[PhaseResult], base: PhaseResult | None) -> tuple[list[str], bool]:
    """PASS/FAIL lines, on the median run: replicas sharing a store against one replica; no
    client error in any run, the store-killed runs included. Without a store (local or blended
    load) and with the store killed, the figures are shown, not judged: they show what the
    store is for."""
    lines: list[str] = []
    ok = True
    for r in results:
        if r.result.errors:
            ok = False
            lines.append(f"FAIL: {r.phase.name}: {r.result.errors} requests failed")
        if base is None or r.phase.replicas == 1:
            continue
        delta = 100 * (r.hit_rate - base.hit_rate)
        ratio = r.ttft_p90_ms / base.ttft_p90_ms if base.ttft_p90_ms else float("inf")
        hit_ok = abs(delta) <= HIT_RATE_POINTS or delta > 0
        ttft_ok = ratio <= 1 + TTFT_P90_TOLERANCE
        judged = r.phase.shared and not r.phase.kill_store
        if judged:
            ok = ok and hit_ok and ttft_ok
        word = ("PASS" if hit_ok and ttft_ok else "FAIL") if judged else "shown"
        lines.append(
            f"{word}: {r.phase.name}: hit rate {r.hit_rate:.1%} ({delta:+.1f} points vs "
            f"{base.hit_rate:.1%}; needs within {HIT_RATE_POINTS:g}), TTFT p90 "
            f"{r.ttft_p90_ms:.0f} ms = {ratio:.2f}× one replica's {base.ttft_p90_ms:.0f} ms "
            f"(needs ≤ {1 + TTFT_P90_TOLERANCE:.1f}×)"
        )
    return lines, ok
