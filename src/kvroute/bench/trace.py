"""`kvroute bench trace FILE`: a Mooncake-format trace through the gateway once per policy (and
through vllm-router) on identical simulated fleets; hit rate, TTFT, SLO, capacity at the SLO."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette

from kvroute.bench import vllm_router
from kvroute.bench.demo import (
    MODEL,
    POLICIES,
    PolicyStack,
    _Progress,
    failure_text,
    sim_last_finish,
    sim_now,
)
from kvroute.bench.oracle import ORACLE, oracle_index_factory
from kvroute.bench.report import DEFAULT_OUT_DIR, print_table, save_json
from kvroute.bench.trace_summary import (
    RunSummary,
    TraceRecord,
    median_run,
    round_finite,
    round_opt,
    summarise,
)
from kvroute.bench.trace_workload import (
    TokenSynthesizer,
    TraceError,
    TraceRequest,
    TraceScaling,
    arrival_offsets,
    load_trace,
    prefix_reuse,
    trace_rate,
)
from kvroute.core import PolicyName
from kvroute.errors import ConfigError
from kvroute.gateway import ENGINE_HEADER, create_app
from kvroute.gateway.log_format import configure_logging
from kvroute.routing import CostWeights
from kvroute.settings import Settings, load_settings
from kvroute.sim import SimConfig, SimFleet

__all__ = [
    "ORACLE",
    "TRACE_POLICIES",
    "TRACE_SPEED",
    "CapacitySearch",
    "RunSummary",
    "TraceOptions",
    "add_arguments",
    "bisect_time_factor",
    "jittered_factor",
    "options",
    "run",
    "run_trace_async",
]

_SIM = SimConfig()
# The demo's policies but random (--policies adds it, and the oracle): each policy costs
# 1 + capacity_steps runs.
TRACE_POLICIES: tuple[str, ...] = tuple(p for p in POLICIES if p != PolicyName.RANDOM)
_CHOICES: tuple[str, ...] = (*PolicyName, ORACLE)
TRACE_SPEED = 4.0
"""Simulated seconds per wall second of a trace replay unless --speed says otherwise."""
_CLIENT_CONNECTIONS = 2048  # below the gateway's max_connections (4,096): no 503s from it


@dataclass(frozen=True)
class TraceOptions:
    """One `kvroute bench trace` run. Token counts of the fleet (`kv_tokens`,
    `prefill_tok_per_s`) are in trace tokens: the engines get them × the token scale."""

    trace: Path
    policies: tuple[str, ...] = TRACE_POLICIES  # PolicyName values and ORACLE
    # vllm-router's policies (vllm_router.POLICIES) run after kvroute's: `--vs vllm-router`.
    vs: tuple[str, ...] = ()
    peers_venv: Path | None = None  # where vllm-router is installed (None: .venv-peers)
    max_requests: int | None = None  # None: every request of the file
    engines: int = 4
    # KV cache per engine: about what an 80 GB GPU holds for an 8B model (128 KiB per token).
    kv_tokens: int = 1 << 19
    prefill_tok_per_s: float = _SIM.prefill_tok_per_s
    # Prefill tokens an engine computes per step at most, chunking longer prompts as vLLM V1
    # does (sim/scheduler.py); 0: each prompt prefilled whole in one step.
    max_num_batched_tokens: int = 8192
    token_scale: float = TraceScaling.token_scale
    time_factor: float = 1.0  # arrival times × this (< 1: a higher rate than the trace's)
    speed: float = TRACE_SPEED  # simulated seconds per wall second
    slo_ms: float = 5000.0  # TTFT p90 objective
    capacity: bool = True
    capacity_steps: int = 5  # runs of the bisection per policy, beyond the main run
    # Runs per step of the search (the start's included); a step passes when their median
    # TTFT p90 meets the SLO, so one lucky or unlucky run does not decide it.
    capacity_repeats: int = 1
    # Repeat k of a step runs at the step's factor × (1 + jitter × o_k), o = 0, +1, -1, +2, ...:
    # a replay's TTFT p90 can jump by 20% for a 0.1% change of its arrival times (a long prompt
    # landing before or after a queue drains), and same-factor repeats land on the same side.
    capacity_jitter: float = 0.002
    out_dir: Path = DEFAULT_OUT_DIR
    chart: bool = True
    router_settings: tuple[tuple[str, str], ...] = ()  # NAME=VALUE gateway setting overrides

    @property
    def runs(self) -> tuple[str, ...]:
        """Every system replayed, by its name in the report: the policies, then the peers."""
        return (*self.policies, *(vllm_router.peer_run_name(p) for p in self.vs))

    @property
    def scaling(self) -> TraceScaling:
        return TraceScaling(
            token_scale=self.token_scale, block_size=_SIM.block_size, vocab_size=_SIM.vocab_size
        )

    @property
    def num_gpu_blocks(self) -> int:
        return max(1, math.ceil(self.kv_tokens * self.scaling.effective_scale / _SIM.block_size))

    def gateway_settings(self) -> dict[str, str]:
        """The gateway's settings for every run: its token-denominated knobs scaled like the
        prompts (imbalance_tokens; prefill_tok_per_s, so kv_aware's queue model drains at the
        simulated engines' speed), then the overrides."""
        scale = self.scaling.effective_scale
        imbalance = round(CostWeights().imbalance_tokens * scale)
        return {
            "imbalance_tokens": str(imbalance),
            "prefill_tok_per_s": str(self.prefill_tok_per_s * scale),
            **dict(self.router_settings),
        }


# --- capacity search ---------------------------------------------------------------------------


@dataclass
class CapacitySearch:
    """The bisection's outcome: the smallest time factor that met the SLO (the highest arrival
    rate), the largest that missed it, and every trial (time factor, passed) in order."""

    passed: float | None = None
    failed: float | None = None
    trials: list[tuple[float, bool]] = field(default_factory=list)

    @property
    def bracketed(self) -> bool:
        """Both a passing and a failing factor were found: the capacity lies between them."""
        return self.passed is not None and self.failed is not None


async def bisect_time_factor(
    passes: Callable[[float], Awaitable[bool]],
    start: float,
    start_passed: bool,
    steps: int,
    grow: float = 2.0,
) -> CapacitySearch:
    """Search the smallest time factor (arrival times × factor) whose run meets the SLO, given
    the run at `start` and `steps` more runs of `passes`: while only passes (or only misses)
    are known, step by `grow` toward faster (slower) arrivals; once bracketed, bisect
    geometrically. A pass is assumed to stay a pass at any larger factor."""
    if not (math.isfinite(start) and start > 0):
        raise ValueError(f"start: expected a time factor > 0, got {start}")
    if grow <= 1:
        raise ValueError(f"grow: expected > 1, got {grow}")
    search = CapacitySearch(trials=[(start, start_passed)])
    if start_passed:
        search.passed = start
    else:
        search.failed = start
    for _ in range(max(0, steps)):
        if search.passed is None:
            assert search.failed is not None
            factor = search.failed * grow
        elif search.failed is None:
            factor = search.passed / grow
        else:
            factor = math.sqrt(search.failed * search.passed)
        ok = await passes(factor)
        search.trials.append((factor, ok))
        if ok:
            search.passed = factor
        else:
            search.failed = factor
    return search


def jittered_factor(factor: float, repeat: int, jitter: float) -> float:
    """The time factor of a step's `repeat`-th run (0-based): `factor` itself first, then
    `factor` × (1 + `jitter` × o) for o = +1, -1, +2, -2, ... (TraceOptions.capacity_jitter)."""
    if repeat <= 0 or jitter == 0:
        return factor
    offset = (repeat + 1) // 2 * (1 if repeat % 2 else -1)
    return factor * (1.0 + jitter * offset)


# --- one run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Workload:
    """The trace's requests as ready-made request bodies (shared by every run)."""

    requests: list[TraceRequest]
    bodies: list[bytes]
    longest: int  # prompt + output tokens of the longest request
    most_blocks: int  # KV blocks of the largest request
    longest_line: int


def _workload(options: TraceOptions, requests: list[TraceRequest]) -> _Workload:
    synth = TokenSynthesizer(options.scaling)
    bodies: list[bytes] = []
    longest, longest_line = 0, 0
    for r in requests:
        prompt = synth.prompt(r)
        max_tokens = synth.max_tokens(r)
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
        bodies.append(json.dumps(body, separators=(",", ":")).encode())
        total = len(prompt) + max_tokens
        if total > longest:
            longest, longest_line = total, r.line
    return _Workload(
        requests=requests,
        bodies=bodies,
        longest=longest,
        most_blocks=-(-longest // _SIM.block_size),
        longest_line=longest_line,
    )


def _scaled_budget(tokens: int, scale: float) -> int | None:
    """A step budget of `tokens` trace tokens in simulated tokens (None: 0, no chunking)."""
    return max(_SIM.block_size, round(tokens * scale)) if tokens > 0 else None


def _sim_config(options: TraceOptions, workload: _Workload) -> SimConfig:
    scale = options.scaling.effective_scale
    return SimConfig(
        num_gpu_blocks=options.num_gpu_blocks,
        speed=options.speed,
        # A scaled token costs the prefill time of the trace tokens it stands for.
        prefill_tok_per_s=options.prefill_tok_per_s * scale,
        # The step budget scaled like the prompts: a scaled prompt stands for 1/scale times its
        # tokens, and prefilled whole in one step it would hold its engine that much longer.
        max_num_batched_tokens=_scaled_budget(options.max_num_batched_tokens, scale),
        max_model_len=max(_SIM.max_model_len, workload.longest),
        # vLLM's default topic: vllm-router's static event sources subscribe to no other
        # (vllm_router.py); kvroute takes any.
        topic="",
    )


class _OracleStack(PolicyStack):
    """The oracle's stack: kv_aware with an index whose confirmed blocks are the fleet's block
    pools (bench/oracle.py)."""

    def create_app(self, settings: Settings) -> Starlette:
        return create_app(settings, index_factory=oracle_index_factory(self.fleet))


class _PeerStack:
    """A fresh simulated fleet behind vllm-router with one of its policies."""

    def __init__(
        self,
        options: TraceOptions,
        config: SimConfig,
        peer: vllm_router.VllmRouterPeer,
        policy: str,
        workdir: Path,
    ) -> None:
        self.fleet = SimFleet(options.engines, MODEL, config=config)
        self.router = vllm_router.VllmRouter(peer, policy, workdir)
        self.block_size = config.block_size

    async def __aenter__(self) -> str:
        await self.fleet.start()
        try:
            return await self.router.start(
                vllm_router.workers_of(self.fleet), model=MODEL, block_size=self.block_size
            )
        except BaseException:
            await self.fleet.close()
            raise

    def sim_now(self) -> float:
        return sim_now(self.fleet)

    def sim_last_finish(self) -> float:
        return sim_last_finish(self.fleet)

    async def __aexit__(self, *exc: object) -> None:
        await self.router.stop()
        await self.fleet.close()


def _stack(
    options: TraceOptions,
    config: SimConfig,
    name: str,
    workdir: Path,
    peer: vllm_router.VllmRouterPeer | None,
) -> PolicyStack | _PeerStack:
    """A fresh fleet with the router of run `name`: a kvroute policy, the oracle, or a peer's."""
    prefix = f"{vllm_router.PEER}:"
    if name.startswith(prefix):
        assert peer is not None, "a peer run needs the peer (run_trace_async finds it)"
        return _PeerStack(options, config, peer, name.removeprefix(prefix), workdir)
    policy = PolicyName.KV_AWARE if name == ORACLE else PolicyName(name)
    settings = {**options.gateway_settings(), "policy": policy}
    kind = _OracleStack if name == ORACLE else PolicyStack
    return kind(options.engines, config, settings, workdir, name)


def _engine(response: httpx.Response | None, data: dict[str, Any]) -> str:
    """The engine that served a request: kvroute's response header, else (behind another
    router) the simulator's own `sim.engine` field."""
    if response is None:
        return "?"
    name = response.headers.get(ENGINE_HEADER)
    if name is None:
        sim = data.get("sim")
        name = sim.get("engine") if isinstance(sim, dict) else None
    return str(name) if name else "?"


def _header_ms(response: httpx.Response | None, name: str) -> float | None:
    value = response.headers.get(name) if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


async def _replay(
    url: str,
    bodies: Sequence[bytes],
    arrivals: Sequence[float],
    speed: float,
    sim_now: Callable[[], float],
    on_done: Callable[[], None],
) -> list[TraceRecord]:
    """Send every body at its arrival offset (simulated seconds; open loop: nothing waits for an
    answer), noting when each really went out on the simulated clock."""
    records: list[TraceRecord] = []
    n = min(len(bodies), _CLIENT_CONNECTIONS)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    timeout = httpx.Timeout(600.0, pool=None)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=timeout, trust_env=False
    ) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()
        sim_start = sim_now()

        async def one(index: int, body: bytes, at: float) -> None:
            delay = start + at / speed - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = sim_now() - sim_start
            response: httpx.Response | None = None
            data: dict[str, Any] = {}
            error = None
            posted = loop.time()
            try:
                response = await client.post("/v1/completions", content=body, headers=headers)
                status = response.status_code
                if status == 200:
                    data = response.json()
                else:
                    error = failure_text(response, limit=200)
            except (httpx.HTTPError, ValueError) as exc:
                status, error = 0, failure_text(None, exc, limit=200)
            waited_ms = (loop.time() - posted) * 1000.0
            usage = data.get("usage") or {}
            details = usage.get("prompt_tokens_details") or {}
            e2e = _header_ms(response, "x-sim-e2e-ms")
            records.append(
                TraceRecord(
                    index=index,
                    engine=_engine(response, data),
                    status=status,
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    cached_tokens=int(details.get("cached_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0),
                    ttft_ms=_header_ms(response, "x-sim-ttft-ms"),
                    e2e_ms=e2e,
                    sent_s=sent,
                    late_ms=max(0.0, (sent - at) * 1000.0),
                    error=error,
                    added_ms=waited_ms - e2e / speed if e2e is not None else None,
                )
            )
            on_done()

        await asyncio.gather(
            *(one(i, b, at) for i, (b, at) in enumerate(zip(bodies, arrivals, strict=True)))
        )
    return records


async def _run_once(
    options: TraceOptions,
    workload: _Workload,
    config: SimConfig,
    name: str,
    time_factor: float,
    workdir: Path,
    tick: Callable[[], None],
    peer: vllm_router.VllmRouterPeer | None = None,
) -> RunSummary:
    arrivals = arrival_offsets(workload.requests, time_factor)
    run = _stack(options, config, name, workdir, peer)
    async with run as url:
        sim_start = run.sim_now()
        records = await _replay(url, workload.bodies, arrivals, options.speed, run.sim_now, tick)
        sim_span = run.sim_last_finish() - sim_start
    return summarise(name, time_factor, records, sim_span, options.engines, options.slo_ms)


# --- the whole benchmark -----------------------------------------------------------------------


@dataclass
class _PolicyOutcome:
    main: RunSummary
    search: CapacitySearch | None = None
    runs: dict[float, RunSummary] = field(default_factory=dict)  # by time factor (the median)
    # Every run at a step's factor (each at its own jittered factor), when the search repeats.
    repeats: dict[float, list[RunSummary]] = field(default_factory=dict)

    @property
    def capacity_rps(self) -> float | None:
        """The arrival rate achieved by the fastest run that met the SLO (None: none did)."""
        if self.search is None or self.search.passed is None:
            return None
        return self.runs[self.search.passed].arrival_rps


_SLOW_RATE = 0.95  # a run whose arrivals came slower than this × the asked rate is flagged,
_LATE_SHARE_OF_SLO = 0.05  # and one whose requests went out later than this × the SLO (p90)


async def run_trace_async(options: TraceOptions) -> int:
    """Replay the trace once per policy (then the capacity searches); print, write, chart.
    PeerMissing (before anything starts) when `options.vs` asks for an absent vllm-router."""
    started = time.perf_counter()
    peer = vllm_router.find_vllm_router(options.peers_venv) if options.vs else None
    requests = load_trace(options.trace, options.max_requests)
    workload = _workload(options, requests)
    config = _sim_config(options, workload)
    if workload.most_blocks > config.num_gpu_blocks:
        raise ConfigError(
            f"the request on line {workload.longest_line} needs {workload.most_blocks} KV blocks, "
            f"an engine has {config.num_gpu_blocks}: raise --kv-tokens"
        )
    rate = trace_rate(requests)
    scaling = options.scaling
    outcomes: dict[str, _PolicyOutcome] = {}
    with tempfile.TemporaryDirectory(prefix="kvroute-trace-") as tmp, _Progress() as progress:
        workdir = Path(tmp)
        rate_text = f"{rate * options.time_factor**-1:.2f} req/s" if rate else "one burst"
        # An unbounded cache's hit rate (the trace's own reuse), then one fleet-sized LRU's.
        reuse = prefix_reuse(requests), prefix_reuse(requests, _fleet_hash_blocks(options, config))
        progress.note(
            f"kvroute bench trace: {options.trace} ({len(requests)} requests, arrivals "
            f"×{options.time_factor:g} in time: {rate_text}); {options.engines} simulated engines "
            f"of {config.num_gpu_blocks} blocks × {config.block_size} tokens; "
            f"{scaling.tokens_per_hash} tokens per hash id (scale {scaling.effective_scale:g}); "
            f"sim speed ×{options.speed:g}; TTFT SLO p90 ≤ {options.slo_ms:g} ms; the trace "
            f"reuses {reuse[0]:.1%} of its prompt tokens (an unbounded cache's hit rate), one LRU "
            f"cache of the fleet's KV would hit {reuse[1]:.1%}"
            + (f"; vs vllm-router {peer.version}" if peer is not None else "")
        )
        for name in options.runs:
            tick = progress.phase(f"{name} ×{options.time_factor:g}", len(requests))
            main = await _run_once(
                options, workload, config, name, options.time_factor, workdir, tick, peer
            )
            outcomes[name] = _PolicyOutcome(main, runs={main.time_factor: main})
        if options.capacity:
            for name in options.runs:
                outcome = outcomes[name]
                step = 0

                async def repeated(
                    factor: float, first: RunSummary | None, label: str, name: str = name
                ) -> bool:
                    """The step at `factor`: `capacity_repeats` runs (`first` is one already
                    made), the median's verdict."""
                    done = [] if first is None else [first]
                    while len(done) < options.capacity_repeats:
                        again = f" run {len(done) + 1}/{options.capacity_repeats}"
                        tick = progress.phase(
                            label + (again if options.capacity_repeats > 1 else ""),
                            len(requests),
                        )
                        at = jittered_factor(factor, len(done), options.capacity_jitter)
                        done.append(
                            await _run_once(
                                options, workload, config, name, at, workdir, tick, peer
                            )
                        )
                    outcomes[name].runs[factor] = median_run(done)
                    if len(done) > 1:
                        outcomes[name].repeats[factor] = done
                    return outcomes[name].runs[factor].passes(options.slo_ms)

                async def passes(factor: float, name: str = name) -> bool:
                    nonlocal step
                    step += 1
                    label = f"{name} capacity {step}/{options.capacity_steps} ×{factor:.3g}"
                    return await repeated(factor, None, label, name)

                start = options.time_factor
                start_passed = await repeated(start, outcome.main, f"{name} ×{start:g}", name)
                outcome.search = await bisect_time_factor(
                    passes, start, start_passed, options.capacity_steps
                )
    elapsed = time.perf_counter() - started
    _print(options, outcomes)
    for line in _slow_host_notes(options, outcomes, rate):
        print(line)
    for name, outcome in outcomes.items():
        for sample in outcome.main.error_samples:
            print(f"{name}: a failed request: {sample}")
    data = _report(options, outcomes, rate, requests, reuse, config, elapsed)
    path = save_json("trace", data, options.out_dir)
    print(f"wrote {path}")
    if options.chart:
        png = _chart(options, outcomes, options.out_dir / "trace.png")
        if png is not None:
            print(f"wrote {png}")
    print(f"trace replay finished in {elapsed:.0f} s")
    errors = sum(o.main.errors for o in outcomes.values())
    if errors:
        print(f"FAIL: {errors} requests failed")
        return 1
    return 0


def _slow_host_notes(
    options: TraceOptions, outcomes: dict[str, _PolicyOutcome], rate: float | None
) -> list[str]:
    """A line per run whose requests went out markedly slower than asked: the host could not
    keep up with the simulated speed, so that run saw a lighter load than the trace's."""
    notes = []
    for name, outcome in outcomes.items():
        for factor, run in outcome.runs.items():
            asked = rate / factor if rate is not None else None
            slow = asked is not None and (run.arrival_rps or 0.0) < _SLOW_RATE * asked
            if slow or run.late_ms["p90"] > _LATE_SHARE_OF_SLO * options.slo_ms:
                achieved = f"{run.arrival_rps:.2f}" if run.arrival_rps is not None else "-"
                wanted = f"{asked:.2f}" if asked is not None else "-"
                notes.append(
                    f"note: {name} ×{factor:.3g}: requests went out {run.late_ms['p90']:.0f} ms "
                    f"late (p90; {achieved} req/s for {wanted}): the host did not keep up with "
                    f"--speed {options.speed:g}, so this run saw a lighter load; a lower "
                    "--speed is steadier"
                )
    return notes


def _capacity_text(outcome: _PolicyOutcome) -> str:
    search = outcome.search
    if search is None:
        return "-"
    capacity = outcome.capacity_rps
    if capacity is None:
        return "below range" if search.passed is None else "n/a"
    return f"{capacity:.2f}" if search.bracketed else f"≥ {capacity:.2f}"


def _print(options: TraceOptions, outcomes: dict[str, _PolicyOutcome]) -> None:
    print_table(
        f"kvroute bench trace: {options.trace.name}, simulated ms (added: wall ms); SLO TTFT "
        f"p90 ≤ {options.slo_ms:g} ms",
        [
            "policy",
            "hit rate",
            "TTFT p50",
            "TTFT p90",
            "TTFT p99",
            "e2e p50",
            "e2e p90",
            "req/s",
            "SLO met",
            "max/mean",
            "capacity req/s",
            "added p50",
            "added p90",
            "errors",
        ],
        [
            [
                name,
                f"{o.main.hit_rate:.1%}",
                o.main.ttft_ms["p50"],
                o.main.ttft_ms["p90"],
                o.main.ttft_ms["p99"],
                o.main.e2e_ms["p50"],
                o.main.e2e_ms["p90"],
                o.main.throughput_rps,
                f"{o.main.slo_attainment:.1%}",
                f"{o.main.load_max_over_mean:.2f}",
                _capacity_text(o),
                o.main.added_ms.get("p50", math.nan),
                o.main.added_ms.get("p90", math.nan),
                o.main.errors,
            ]
            for name, o in outcomes.items()
        ],
    )


def _report(
    options: TraceOptions,
    outcomes: dict[str, _PolicyOutcome],
    rate: float | None,
    requests: Sequence[TraceRequest],
    reuse: tuple[float, float],
    config: SimConfig,
    elapsed: float,
) -> dict[str, Any]:
    policies: dict[str, Any] = {}
    for name, o in outcomes.items():
        entry = o.main.summary()
        entry["capacity_rps_at_slo"] = round_opt(o.capacity_rps, 3)
        if o.search is not None:
            entry["capacity"] = {
                "time_factor": o.search.passed,
                "bracketed": o.search.bracketed,
                "trials": [
                    {
                        "time_factor": round(f, 4),
                        "ttft_p90_ms": round_finite(o.runs[f].ttft_p90_all_ms),
                        **(
                            {
                                "ttft_p90_ms_runs": [
                                    round_finite(r.ttft_p90_all_ms) for r in o.repeats[f]
                                ],
                                "time_factor_runs": [round(r.time_factor, 5) for r in o.repeats[f]],
                            }
                            if f in o.repeats
                            else {}
                        ),
                        "arrival_rps": round_opt(o.runs[f].arrival_rps, 3),
                        "passed": ok,
                    }
                    for f, ok in o.search.trials
                ],
            }
        policies[name] = entry
    scaling = options.scaling
    return {
        "trace": str(options.trace),
        "slo_ms": options.slo_ms,
        "policies": policies,
        "setup": {
            "requests": len(requests),
            "trace_rate_rps": round_opt(rate, 3),
            # the hit rate of one unbounded cache holding every earlier prompt: the trace's reuse
            "prefix_reuse": round(reuse[0], 4),
            # the same for one LRU cache as large as the whole fleet's KV: finite pools' reference
            "fleet_lru_reuse": round(reuse[1], 4),
            "time_factor": options.time_factor,
            "arrival_rate_rps": round_opt(rate / options.time_factor if rate else None, 3),
            "token_scale": scaling.effective_scale,
            "tokens_per_hash": scaling.tokens_per_hash,
            "engines": options.engines,
            "num_gpu_blocks": config.num_gpu_blocks,
            "block_size": config.block_size,
            "kv_tokens_per_engine": options.kv_tokens,
            "prefill_tok_per_s": options.prefill_tok_per_s,
            "sim_prefill_tok_per_s": config.prefill_tok_per_s,
            "max_num_batched_tokens": options.max_num_batched_tokens,
            "sim_max_num_batched_tokens": config.max_num_batched_tokens,
            "decode_step_s": config.decode_step_s,
            "sim_speed": options.speed,
            "capacity_steps": options.capacity_steps if options.capacity else 0,
            "capacity_repeats": options.capacity_repeats if options.capacity else 0,
            "capacity_jitter": options.capacity_jitter,
            "gateway_settings": options.gateway_settings(),
            "wall_seconds": round(elapsed, 1),
        },
    }


def _fleet_hash_blocks(options: TraceOptions, config: SimConfig) -> int:
    """The fleet's KV in trace blocks (hash ids): every engine's pool as one."""
    tokens = options.engines * config.num_gpu_blocks * config.block_size
    return max(1, tokens // options.scaling.tokens_per_hash)


_COLORS = {PolicyName.KV_AWARE: "#2a9d8f", ORACLE: "#264653", vllm_router.PEER: "#e9c46a"}


def _chart(options: TraceOptions, outcomes: dict[str, _PolicyOutcome], path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        print("no chart: matplotlib is not installed (pip install 'kvroute[bench]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(outcomes)
    colors = [_COLORS.get(n.split(":")[0], "#8d99ae") for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    axes[0].bar(names, [100 * outcomes[n].main.hit_rate for n in names], color=colors)
    axes[0].set_title("prefix cache hit rate (%)")
    for n in names:
        ttfts = outcomes[n].main.ttfts
        if ttfts:
            ys = [(i + 1) / len(ttfts) for i in range(len(ttfts))]
            axes[1].step(ttfts, ys, where="post", label=n)
    axes[1].axvline(options.slo_ms, color="#e76f51", linestyle="--", label="SLO")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("TTFT (ms, simulated)")
    axes[1].set_title("TTFT CDF")
    axes[1].legend(fontsize=8)
    capacities = [outcomes[n].capacity_rps or 0.0 for n in names]
    axes[2].bar(names, capacities, color=colors)
    axes[2].set_title(f"capacity at TTFT p90 ≤ {options.slo_ms:g} ms (req/s)")
    if not options.capacity:
        axes[2].text(
            0.5, 0.5, "not measured (--no-capacity)", ha="center", transform=axes[2].transAxes
        )
    for ax in (axes[0], axes[2]):
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"kvroute bench trace: {options.trace.name}, {options.engines} simulated engines")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- command line ------------------------------------------------------------------------------


def add_arguments(parser: Any) -> None:
    """`kvroute bench trace` flags on `parser` (an argparse parser or argument group)."""
    d = TraceOptions(trace=Path())
    parser.add_argument(
        "--policies",
        default=",".join(d.policies),
        help="comma-separated policies to replay the trace with: kvroute's, or oracle (kv_aware "
        "routing on the simulated engines' true cache contents, no event delay)",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        metavar="N",
        help="replay the first N requests of the trace (default: all of them)",
    )
    parser.add_argument(
        "--engines", type=int, default=d.engines, help="simulated engines in the fleet"
    )
    parser.add_argument(
        "--kv-tokens",
        type=int,
        default=d.kv_tokens,
        help="KV cache per engine in trace tokens (before --token-scale; 524,288 is about an "
        "8B model on an 80 GB GPU)",
    )
    parser.add_argument(
        "--prefill-tok-per-s",
        type=float,
        default=d.prefill_tok_per_s,
        help="prefill speed of an engine in trace tokens per simulated second",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=d.max_num_batched_tokens,
        help="prefill tokens an engine computes per step at most, in trace tokens (vLLM V1 "
        "chunks longer prompts; scaled like them); 0: each prompt prefilled whole (default "
        "%(default)s)",
    )
    parser.add_argument(
        "--token-scale",
        type=float,
        default=d.token_scale,
        help="simulated tokens per trace token; each hash id's 512 tokens become 512 × this, "
        "rounded to whole 16-token blocks",
    )
    parser.add_argument(
        "--time-factor",
        type=float,
        default=d.time_factor,
        help="arrival times × this (0.5: twice the trace's request rate)",
    )
    parser.add_argument(
        "--slo-ms",
        type=float,
        default=d.slo_ms,
        help="TTFT objective in simulated ms: a run meets it when its TTFT p90 is at most this",
    )
    parser.add_argument(
        "--capacity-steps",
        type=int,
        default=d.capacity_steps,
        help="runs per policy of the search for the highest arrival rate meeting the SLO",
    )
    parser.add_argument(
        "--capacity-repeats",
        type=int,
        default=d.capacity_repeats,
        help="runs per step of that search (the first run's included); a step passes when "
        "their median TTFT p90 meets the SLO (default %(default)s)",
    )
    parser.add_argument(
        "--capacity-jitter",
        type=float,
        default=d.capacity_jitter,
        help="a step's repeats run at its time factor × (1 ± this, ± twice this, ...), so they "
        "sample its neighbourhood: a replay's TTFT p90 can change by 20%% for a 0.1%% change "
        "of arrival times (default %(default)s; 0: every repeat at the same factor)",
    )
    parser.add_argument(
        "--no-capacity", action="store_true", help="skip the capacity search (one run per policy)"
    )
    parser.add_argument(
        "--router-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a gateway setting for every run (repeatable), e.g. w_load=0.5 "
        "(default: none)",
    )
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG chart")


def options(args: argparse.Namespace) -> TraceOptions:
    """TraceOptions from parsed `kvroute bench` arguments; ConfigError for a bad value."""
    d = TraceOptions(trace=Path())
    if args.file is None:
        raise ConfigError("expected the trace file: kvroute bench trace FILE")
    names = [p.strip() for p in str(args.policies).split(",") if p.strip()]
    unknown = [p for p in names if p not in _CHOICES]
    if unknown or not names:
        raise ConfigError(f"--policies: expected some of {', '.join(_CHOICES)}, got {unknown}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--policies: each policy once, got {names}")
    for flag, value, low in (
        ("--max-requests", args.max_requests, 1),
        ("--engines", args.engines, 1),
        ("--kv-tokens", args.kv_tokens, 1),
        ("--capacity-steps", args.capacity_steps, 0),
        ("--capacity-repeats", args.capacity_repeats, 1),
        ("--max-num-batched-tokens", args.max_num_batched_tokens, 0),
    ):
        if value is not None and value < low:
            raise ConfigError(f"{flag}: expected >= {low}, got {value}")
    for flag, number in (
        ("--prefill-tok-per-s", args.prefill_tok_per_s),
        ("--time-factor", args.time_factor),
        ("--slo-ms", args.slo_ms),
        ("--speed", args.speed if args.speed is not None else d.speed),
    ):
        if not (math.isfinite(number) and number > 0):
            raise ConfigError(f"{flag}: expected > 0, got {number}")
    if not (math.isfinite(args.capacity_jitter) and 0 <= args.capacity_jitter < 0.1):
        raise ConfigError(f"--capacity-jitter: expected in [0, 0.1), got {args.capacity_jitter}")
    settings: list[tuple[str, str]] = []
    for item in args.router_setting:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--router-setting: expected NAME=VALUE, got {item!r}")
        settings.append((name, value))
    try:
        TraceScaling(token_scale=args.token_scale)
    except ValueError as exc:
        raise ConfigError(f"--token-scale: {exc}") from None
    opts = TraceOptions(
        trace=Path(args.file),
        policies=tuple(names),
        vs=vllm_router.POLICIES if args.vs == vllm_router.PEER else (),
        peers_venv=args.peers_venv,
        max_requests=args.max_requests,
        engines=args.engines,
        kv_tokens=args.kv_tokens,
        prefill_tok_per_s=args.prefill_tok_per_s,
        max_num_batched_tokens=args.max_num_batched_tokens,
        token_scale=args.token_scale,
        time_factor=args.time_factor,
        speed=args.speed if args.speed is not None else d.speed,
        slo_ms=args.slo_ms,
        capacity=not args.no_capacity,
        capacity_steps=args.capacity_steps,
        capacity_repeats=args.capacity_repeats,
        capacity_jitter=args.capacity_jitter,
        out_dir=args.out_dir,
        chart=not args.no_chart,
        router_settings=tuple(settings),
    )
    load_settings(**opts.gateway_settings())  # a bad name or value is reported before starting
    return opts


def run(args: argparse.Namespace) -> int:
    """Entry point of `kvroute bench trace FILE`; 2 for bad arguments or trace, 1 for errors."""
    prog = "kvroute bench trace"
    if args.vs not in (None, vllm_router.PEER):
        print(f"{prog}: --vs {args.vs} compares ingest only", file=sys.stderr)
        return 2
    if args.vs is None and args.peers_venv is not None:
        print(f"{prog}: --peers-venv goes with --vs vllm-router", file=sys.stderr)
        return 2
    configure_logging("warning")
    try:
        opts = options(args)
        code: int = asyncio.run(run_trace_async(opts))
    except (ConfigError, TraceError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except vllm_router.PeerMissing as exc:
        print(f"{prog}: --vs vllm-router: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # the peer did not start or answer: say so, no traceback
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return code
