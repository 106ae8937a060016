"""`kvroute demo`: a simulated fleet behind the gateway, one chat workload driven once per
policy; prints the comparison, writes bench-results/demo.json and demo.png, checks thresholds."""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette

from kvroute.bench.chat_trace import write_chat_trace
from kvroute.bench.report import DEFAULT_OUT_DIR, print_table, save_json
from kvroute.bench.workload import ChatTurn, ChatWorkload, ChatWorkloadSpec, poisson_arrivals
from kvroute.core import PolicyName
from kvroute.errors import ConfigError
from kvroute.gateway import ENGINE_HEADER, BackgroundServer, create_app
from kvroute.gateway.log_format import configure_logging
from kvroute.settings import Settings, load_settings
from kvroute.sim import SimConfig, SimFleet

__all__ = [
    "DemoOptions",
    "PolicyResult",
    "PolicyStack",
    "add_demo_arguments",
    "add_population_arguments",
    "request_record",
    "run_demo",
    "run_demo_async",
    "sim_last_finish",
    "sim_now",
]

POLICIES: tuple[PolicyName, ...] = (
    PolicyName.KV_AWARE,
    PolicyName.ROUND_ROBIN,
    PolicyName.LEAST_LOADED,
    PolicyName.RANDOM,
)
MODEL = "sim-llama-8b"
HIT_RATE_FACTOR = 1.5  # kv_aware's hit rate must be at least this × round robin's
TTFT_P90_FACTOR = 0.5  # kv_aware's TTFT p90 must be at most this × round robin's


@dataclass(frozen=True)
class DemoOptions:
    engines: int = 4
    num_gpu_blocks: int = 2048
    speed: float = 2.0  # simulated seconds per wall second
    load: float = 0.8  # arrival rate as a fraction of the measured round-robin capacity
    policies: tuple[PolicyName, ...] = POLICIES
    workload: ChatWorkloadSpec = field(default_factory=ChatWorkloadSpec)
    out_dir: Path = DEFAULT_OUT_DIR
    check: bool = True  # exit non-zero when the thresholds are missed
    chart: bool = True
    router_settings: tuple[tuple[str, str], ...] = ()  # NAME=VALUE gateway setting overrides


@dataclass(frozen=True)
class RequestRecord:
    turn: ChatTurn
    engine: str
    status: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    sent_s: float  # wall offsets from the run's start
    done_s: float
    error: str = ""  # why a request failed: its status and body, or the exception; "" if ok


def failure_text(
    response: httpx.Response | None, exc: BaseException | None = None, *, limit: int = 240
) -> str:
    """A failed request in one line for the run's report: the exception, else the status and
    the start of the body, each cut to `limit` characters (a failure's log must not be lost,
    README "Benchmarks"). The demo and `kvroute bench trace` report failures this way."""
    if exc is not None:
        return f"{type(exc).__name__}: {str(exc)[:limit]}"
    if response is None:
        return "no response"
    body = response.text.replace("\n", " ")[:limit]
    return f"HTTP {response.status_code}: {body}"


def request_record(
    turn: ChatTurn,
    response: httpx.Response | None,
    status: int,
    data: dict[str, Any],
    sent_s: float,
    done_s: float,
    error: str = "",
) -> RequestRecord:
    """The record of one chat turn sent through a gateway: the engine that served it (the
    gateway's header), the usage it reported and the simulator's TTFT header."""
    usage = data.get("usage") or {}
    ttft = response.headers.get("x-sim-ttft-ms") if response is not None else None
    return RequestRecord(
        turn=turn,
        engine=response.headers.get(ENGINE_HEADER, "?") if response is not None else "?",
        status=status,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        ttft_ms=float(ttft) if ttft is not None else None,
        sent_s=sent_s,
        done_s=done_s,
        error=error if status != 200 else "",
    )


@dataclass(frozen=True)
class PolicyResult:
    policy: str
    hit_rate: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    output_tok_s: float  # simulated
    load_max_over_mean: float
    requests: int
    errors: int
    per_engine: dict[str, int]
    sim_seconds: float
    error_samples: tuple[str, ...] = ()  # the first few failures, as `failure_text` says them

    def summary(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "hit_rate": round(self.hit_rate, 4),
            "ttft_p50_ms": round(self.ttft_p50_ms, 2),
            "ttft_p90_ms": round(self.ttft_p90_ms, 2),
            "output_tok_s": round(self.output_tok_s, 1),
            "load_max_over_mean": round(self.load_max_over_mean, 3),
            "requests": self.requests,
            "errors": self.errors,
            "error_samples": list(self.error_samples),
            "requests_per_engine": self.per_engine,
            "sim_seconds": round(self.sim_seconds, 2),
        }


def add_population_arguments(parser: Any) -> None:
    """--groups and --users-per-group: the chat workload's users (demo and replicas)."""
    parser.add_argument(
        "--groups",
        type=int,
        default=ChatWorkloadSpec.groups,
        help="system prompts shared by the users (fewer: hotter prefixes)",
    )
    parser.add_argument(
        "--users-per-group",
        type=int,
        default=ChatWorkloadSpec.users_per_group,
        help="chat users per system prompt",
    )


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="directory for the JSON results and the chart",
    )
    parser.add_argument(
        "--speed",
        type=float,
        default=DemoOptions.speed,
        help="simulated seconds per wall second",
    )
    parser.add_argument(
        "--load",
        type=float,
        default=DemoOptions.load,
        help="arrival rate as a fraction of round-robin capacity",
    )
    parser.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help="comma-separated policies to compare",
    )
    add_population_arguments(parser)
    parser.add_argument(
        "--turns", type=int, default=ChatWorkloadSpec.turns, help="turns of each user's chat"
    )
    parser.add_argument(
        "--system-tokens",
        type=int,
        default=ChatWorkloadSpec.system_tokens,
        help="tokens of each group's shared system prompt (an agent's tool definitions: 4096)",
    )
    parser.add_argument(
        "--seed", type=int, default=ChatWorkloadSpec.seed, help="seed of the random workload"
    )
    parser.add_argument(
        "--no-check", action="store_true", help="always exit 0 (do not enforce the thresholds)"
    )
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    parser.add_argument(
        "--router-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a gateway setting for every policy run (repeatable), e.g. w_load=0.5 "
        "(default: none)",
    )
    parser.add_argument(
        "--write-trace",
        type=Path,
        metavar="FILE",
        help="write the workload as a Mooncake-format trace for `kvroute bench trace` (open "
        "loop, Poisson arrivals at --trace-rate) and exit without running the demo (default: "
        "none; the demo runs)",
    )
    parser.add_argument(
        "--trace-rate",
        type=float,
        default=DEMO_TRACE_RATE,
        help="arrival rate of --write-trace's trace, requests per simulated second",
    )


DEMO_TRACE_RATE = 8.0
"""Requests per simulated second of `kvroute demo --write-trace` (the issue's lower rate)."""

# The demo's fleet in `kvroute bench trace`'s units (1/32 scale): 2,048 blocks of 16 tokens
# per engine, prefill at the simulator's 16,000 tokens/s, and the demo's TTFT objective.
DEMO_TRACE_FLAGS = "--kv-tokens 1048576 --prefill-tok-per-s 512000 --slo-ms 690"


def _write_trace(args: argparse.Namespace, options: DemoOptions) -> int:
    rate = float(args.trace_rate)
    try:
        n = write_chat_trace(args.write_trace, options.workload, rate)
    except (OSError, ValueError) as exc:
        print(f"kvroute demo: --write-trace: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.write_trace}: {n} requests at {rate:g} req/s")
    print(
        "replay it like the demo's fleet: "
        f"kvroute bench trace {args.write_trace} {DEMO_TRACE_FLAGS}"
    )
    return 0


def _options(args: argparse.Namespace) -> DemoOptions:
    defaults = DemoOptions()
    names = [p.strip() for p in str(getattr(args, "policies", ",".join(POLICIES))).split(",")]
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise ConfigError(f"--policies: expected some of {', '.join(POLICIES)}, got {unknown}")
    policies = tuple(PolicyName(p) for p in names)
    for item in getattr(args, "router_setting", []):
        if "=" not in item:
            raise ConfigError(f"--router-setting: expected NAME=VALUE, got {item!r}")
    spec = ChatWorkloadSpec(
        groups=getattr(args, "groups", ChatWorkloadSpec.groups),
        users_per_group=getattr(args, "users_per_group", ChatWorkloadSpec.users_per_group),
        turns=getattr(args, "turns", ChatWorkloadSpec.turns),
        system_tokens=getattr(args, "system_tokens", ChatWorkloadSpec.system_tokens),
        seed=getattr(args, "seed", ChatWorkloadSpec.seed),
    )
    return DemoOptions(
        speed=getattr(args, "speed", defaults.speed),
        load=getattr(args, "load", defaults.load),
        policies=policies,
        workload=spec,
        out_dir=getattr(args, "out_dir", defaults.out_dir),
        check=not getattr(args, "no_check", False),
        chart=not getattr(args, "no_chart", False),
        router_settings=(
            *defaults.router_settings,
            *(
                (name, value)
                for name, _, value in (
                    item.partition("=") for item in getattr(args, "router_setting", [])
                )
            ),
        ),
    )


def run_demo(args: argparse.Namespace) -> int:
    """Entry point of `kvroute demo`; the exit code says whether the thresholds were met."""
    configure_logging("warning")
    try:
        options = _options(args)
        load_settings(**dict(options.router_settings))  # report bad overrides before starting
    except ConfigError as exc:
        print(f"kvroute demo: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "write_trace", None) is not None:
        return _write_trace(args, options)
    return asyncio.run(run_demo_async(options))


# --- running one phase -------------------------------------------------------------------------


class PolicyStack:
    """A fresh simulated fleet and a fresh gateway (cold caches, no history): `settings` are
    gateway settings by name (the policy among them), `workdir` gets the fleet file `name`.yaml.
    The demo and `kvroute bench trace` run one per policy."""

    def __init__(
        self,
        engines: int,
        config: SimConfig,
        settings: Mapping[str, object],
        workdir: Path,
        name: str,
    ) -> None:
        self.settings = dict(settings)
        self.fleet = SimFleet(engines, MODEL, config=config)
        self.fleet_file = workdir / f"fleet-{name}.yaml"
        self.server: BackgroundServer | None = None

    def create_app(self, settings: Settings) -> Starlette:
        """The gateway's app; a subclass may build it differently (the trace bench's oracle)."""
        return create_app(settings)

    async def __aenter__(self) -> str:
        await self.fleet.start()
        self.fleet.write_fleet_file(self.fleet_file)
        settings = load_settings(
            **self.settings,
            fleet_file=self.fleet_file,
            port=0,
            log_level="warning",
        )
        self.server = BackgroundServer(self.create_app(settings))
        return await self.server.start()

    def sim_now(self) -> float:
        return sim_now(self.fleet)

    def sim_last_finish(self) -> float:
        return sim_last_finish(self.fleet)

    async def __aexit__(self, *exc: object) -> None:
        if self.server is not None:
            await self.server.stop()
        await self.fleet.close()


def sim_now(fleet: SimFleet) -> float:
    """The fleet's simulated clock (every engine of a fleet starts together)."""
    return fleet.engines[0].sim_now()


def sim_last_finish(fleet: SimFleet) -> float:
    """The latest simulated clock over the engines' schedulers (their last step's end)."""
    return max(r.scheduler.clock for e in fleet.engines for r in e.all_ranks())


async def _drive(
    url: str,
    workload: ChatWorkload,
    turns: Sequence[ChatTurn],
    arrivals_wall: Sequence[float] | None,
    on_done: Callable[[], None],
) -> tuple[list[RequestRecord], float]:
    """Send `turns` to the gateway, each at its arrival offset (None: all at once), a user's
    next turn never before its previous answer. Returns the records and the wall makespan."""
    answer_tokens = workload.spec.answer_tokens
    history: dict[int, list[dict[str, Any]]] = {}
    answered: dict[tuple[int, int], asyncio.Event] = {
        (t.user, t.turn): asyncio.Event() for t in turns
    }
    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=len(turns), max_keepalive_connections=len(turns))
    timeout = httpx.Timeout(300.0)
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=timeout, trust_env=False
    ) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def one(turn: ChatTurn, at: float) -> None:
            delay = start + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            previous = answered.get((turn.user, turn.turn - 1))
            if previous is not None:
                await previous.wait()
            messages = workload.messages(turn, history.get(turn.user))
            sent = loop.time() - start
            body = {"model": MODEL, "messages": messages, "max_tokens": answer_tokens}
            error = ""
            try:
                response = await client.post("/v1/chat/completions", json=body)
                status = response.status_code
                data = response.json() if status == 200 else {}
                if status != 200:
                    error = failure_text(response)
            except (httpx.HTTPError, ValueError) as exc:
                status, data, response, error = 0, {}, None, failure_text(None, exc)
            answer = ""
            if status == 200:
                try:
                    answer = str(data["choices"][0]["message"]["content"] or "")
                except (KeyError, IndexError, TypeError):
                    status = -1  # a 200 without an answer counts as an error
                    error = f"HTTP 200 without an answer: {str(data)[:200]}"
            history.setdefault(turn.user, []).extend(
                [
                    {"role": "user", "content": turn.question},
                    {"role": "assistant", "content": answer},
                ]
            )
            records.append(
                request_record(turn, response, status, data, sent, loop.time() - start, error)
            )
            answered[(turn.user, turn.turn)].set()
            on_done()

        offsets = arrivals_wall if arrivals_wall is not None else [0.0] * len(turns)
        await asyncio.gather(*(one(t, at) for t, at in zip(turns, offsets, strict=True)))
        makespan = loop.time() - start
    return records, makespan


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[k]


async def _measure_capacity(options: DemoOptions, workload: ChatWorkload) -> float:
    """Requests per simulated second the fleet completes when saturated under round robin.

    Every request of the workload (earlier answers made up) is queued at once, request i on
    engine i mod n, straight into the simulated engines: the queues are full before the first
    step, so the engines' own clocks measure pure busy time, whatever the host's speed. The
    rate is taken over the middle half of completions (no start-up or drain tail).
    """
    # Busy engines never wait for wall time, so this phase may run the simulator faster.
    config = SimConfig(num_gpu_blocks=options.num_gpu_blocks, speed=options.speed * 4)
    fleet = SimFleet(options.engines, MODEL, config=config)
    await fleet.start()
    try:
        tokenizer = workload.tokenizer
        generations = []
        for i, turn in enumerate(workload.turns):
            messages = workload.messages(turn, workload.synthetic_history(turn))
            engine = fleet.engines[i % len(fleet.engines)]
            ids = tokenizer.encode_chat(messages)
            generations.append(engine.submit(ids, workload.spec.answer_tokens, None))
        await asyncio.gather(*(g.result() for g in generations))
    finally:
        await fleet.close()
    start = min(g.request.arrival for g in generations)
    done = sorted((g.request.finish_time or start) - start for g in generations)
    lo, hi = len(done) // 4, (3 * len(done)) // 4
    return (hi - lo) / max(done[hi] - done[lo], 1e-9)


def _summarise(
    policy: str, records: Sequence[RequestRecord], sim_seconds: float, options: DemoOptions
) -> PolicyResult:
    ok = [r for r in records if r.status == 200]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    ttfts = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    per_engine = Counter(r.engine for r in ok)
    for e in range(options.engines):
        per_engine.setdefault(f"engine-{e}", 0)
    counts = list(per_engine.values())
    mean = statistics.fmean(counts) if counts else 0.0
    return PolicyResult(
        policy=policy,
        hit_rate=cached / prompt if prompt else 0.0,
        ttft_p50_ms=_percentile(ttfts, 0.5),
        ttft_p90_ms=_percentile(ttfts, 0.9),
        output_tok_s=sum(r.completion_tokens for r in ok) / sim_seconds if sim_seconds else 0.0,
        load_max_over_mean=max(counts) / mean if mean else math.nan,
        requests=len(ok),
        errors=len(records) - len(ok),
        error_samples=tuple(r.error for r in records if r.status != 200)[:3],
        per_engine=dict(sorted(per_engine.items())),
        sim_seconds=sim_seconds,
    )


# --- the whole demo ----------------------------------------------------------------------------


class _Progress:
    """A rich progress bar per phase when rich is installed, a line per phase otherwise."""

    def __init__(self) -> None:
        try:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )
        except ImportError:  # pragma: no cover - rich is in the demo and bench extras
            self._progress: Any = None
            return
        self._progress = Progress(
            TextColumn("{task.description:<34}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )

    def __enter__(self) -> _Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def phase(self, description: str, total: int) -> Callable[[], None]:
        if self._progress is None:
            print(f"{description} ({total} requests) ...", flush=True)
            return lambda: None
        task = self._progress.add_task(description, total=total)
        return lambda: self._progress.advance(task)

    def note(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, flush=True)


async def run_demo_async(options: DemoOptions) -> int:
    started = time.perf_counter()
    workload = ChatWorkload(options.workload)
    turns = workload.turns
    results: list[PolicyResult] = []
    with tempfile.TemporaryDirectory(prefix="kvroute-demo-") as tmp, _Progress() as progress:
        workdir = Path(tmp)
        progress.note(
            f"kvroute demo: {options.engines} simulated engines ({options.num_gpu_blocks} GPU "
            f"blocks each), {workload.spec.groups} groups × {workload.spec.users_per_group} "
            f"users × {workload.spec.turns} turns = {len(turns)} chat requests, "
            f"sim speed ×{options.speed:g}; gateway settings: "
            + (" ".join(f"{k}={v}" for k, v in options.router_settings) or "defaults")
        )
        # 1. capacity of the fleet under round robin, measured on the engines' clocks.
        progress.note("measuring the fleet's capacity under round robin ...")
        capacity = await _measure_capacity(options, workload)
        rate = options.load * capacity
        progress.note(
            f"measured capacity under round robin: {capacity:.2f} req/s (simulated); "
            f"arrivals at {options.load:.0%} = {rate:.2f} req/s"
        )
        arrivals_sim = poisson_arrivals(len(turns), rate, seed=options.workload.seed)
        arrivals_wall = [t / options.speed for t in arrivals_sim]
        # 2. the same workload, once per policy, each on a fresh fleet.
        for policy in options.policies:
            settings = {**dict(options.router_settings), "policy": policy}
            config = SimConfig(num_gpu_blocks=options.num_gpu_blocks, speed=options.speed)
            phase = PolicyStack(options.engines, config, settings, workdir, policy)
            async with phase as url:
                tick = progress.phase(f"workload ({policy})", len(turns))
                sim_start = phase.sim_now()
                records, _ = await _drive(url, workload, turns, arrivals_wall, tick)
                sim_span = phase.sim_last_finish() - sim_start
            results.append(_summarise(policy, records, sim_span, options))
    elapsed = time.perf_counter() - started
    print_table(
        "kvroute demo: prefix hit rate, simulated TTFT (ms), output tokens/s, engine load",
        [
            "policy",
            "hit rate",
            "TTFT p50",
            "TTFT p90",
            "out tok/s",
            "max/mean",
            "errors",
        ],
        [
            [
                r.policy,
                f"{r.hit_rate:.1%}",
                r.ttft_p50_ms,
                r.ttft_p90_ms,
                r.output_tok_s,
                f"{r.load_max_over_mean:.2f}",
                r.errors,
            ]
            for r in results
        ],
    )
    verdict, ok_thresholds = _check(results)
    print(verdict)
    workload_info = {
        **workload.describe(),
        "engines": options.engines,
        "num_gpu_blocks": options.num_gpu_blocks,
        "sim_speed": options.speed,
        "capacity_req_s": round(capacity, 3),
        "capacity_measured_with": (
            "round robin, every request queued at once on the engines, middle half of "
            "completions on the simulated clock"
        ),
        "load_fraction": options.load,
        "arrival_rate_req_s": round(rate, 3),
        "gateway_settings": dict(options.router_settings),
        "wall_seconds": round(elapsed, 1),
    }
    data = {
        "policies": [r.summary() for r in results],
        "workload": workload_info,
        "thresholds": {
            "hit_rate_vs_round_robin": HIT_RATE_FACTOR,
            "ttft_p90_vs_round_robin": TTFT_P90_FACTOR,
            "met": ok_thresholds,
        },
    }
    path = save_json("demo", data, options.out_dir)
    print(f"wrote {path}")
    if options.chart:
        png = _chart(results, options.out_dir / "demo.png", rate)
        if png is not None:
            print(f"wrote {png}")
    print(f"demo finished in {elapsed:.0f} s")
    errors = sum(r.errors for r in results)
    if errors:
        print(f"FAIL: {errors} requests failed")
        for r in results:
            for sample in r.error_samples:
                print(f"  {r.policy}: {sample}")
        return 1
    if options.check and not ok_thresholds:
        return 1
    return 0


def _check(results: Sequence[PolicyResult]) -> tuple[str, bool]:
    by_policy = {r.policy: r for r in results}
    kv, rr = by_policy.get(PolicyName.KV_AWARE), by_policy.get(PolicyName.ROUND_ROBIN)
    if kv is None or rr is None:
        return "thresholds not checked (needs kv_aware and round_robin)", True
    hit_ok = kv.hit_rate >= HIT_RATE_FACTOR * rr.hit_rate
    ttft_ok = kv.ttft_p90_ms <= TTFT_P90_FACTOR * rr.ttft_p90_ms
    hit_ratio = kv.hit_rate / rr.hit_rate if rr.hit_rate else math.inf
    ttft_ratio = kv.ttft_p90_ms / rr.ttft_p90_ms if rr.ttft_p90_ms else math.inf
    lines = [
        f"{'PASS' if hit_ok else 'FAIL'}: kv_aware hit rate {kv.hit_rate:.1%} = "
        f"{hit_ratio:.2f}× round robin's {rr.hit_rate:.1%} (needs ≥ {HIT_RATE_FACTOR}×)",
        f"{'PASS' if ttft_ok else 'FAIL'}: kv_aware TTFT p90 {kv.ttft_p90_ms:.0f} ms = "
        f"{ttft_ratio:.2f}× round robin's {rr.ttft_p90_ms:.0f} ms (needs ≤ {TTFT_P90_FACTOR}×)",
    ]
    return "\n".join(lines), hit_ok and ttft_ok


def _chart(results: Sequence[PolicyResult], path: Path, rate: float) -> Path | None:
    """The PNG of the three panels at `path`; None (and a line saying so) without matplotlib,
    which comes with the `demo` extra (`make demo` installs it)."""
    try:
        import matplotlib
    except ImportError:
        print("no chart: matplotlib is not installed (pip install 'kvroute[demo]')")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.policy for r in results]
    colors = ["#2a9d8f" if n == PolicyName.KV_AWARE else "#8d99ae" for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(names, [100 * r.hit_rate for r in results], color=colors)
    axes[0].set_title("prefix cache hit rate (%)")
    x = range(len(names))
    axes[1].bar([i - 0.2 for i in x], [r.ttft_p50_ms for r in results], 0.4, label="p50")
    axes[1].bar([i + 0.2 for i in x], [r.ttft_p90_ms for r in results], 0.4, label="p90")
    axes[1].set_xticks(list(x), names)
    axes[1].set_title("TTFT (ms, simulated)")
    axes[1].legend()
    axes[2].bar(names, [r.output_tok_s for r in results], color=colors)
    axes[2].set_title("output tokens/s (simulated)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"kvroute demo: chat workload at {rate:.1f} req/s on 4 simulated engines")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
