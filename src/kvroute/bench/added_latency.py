"""`kvroute bench latency`: the router's own added latency (client latency minus the engine's own
end-to-end time) per policy and tokenizer mode, beside engines reached directly and vllm-router."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from kvroute.bench.ingest_vs import cpu_seconds
from kvroute.bench.processes import READY_TIMEOUT_S, ChildProcess, GatewayProcess
from kvroute.bench.report import DEFAULT_OUT_DIR, bar_chart, print_table, save_json
from kvroute.bench.sim_tokenizer_files import write_sim_tokenizer
from kvroute.bench.vllm_router import (
    LOAD_POLICY,
    PeerMissing,
    RouterWorker,
    VllmRouter,
    VllmRouterPeer,
    find_vllm_router,
)
from kvroute.bench.workload import poisson_arrivals
from kvroute.core import PolicyName
from kvroute.sim.tokenizer import SimTokenizer

__all__ = ["LatencyOptions", "add_arguments", "options", "run"]

MODEL = "sim/latency"
ENGINES = 2
PREFIXES = 8  # shared system prompts; each request adds a part of its own (no two alike)
WARMUP = 8  # requests per target before the timed ones (connections, first-use costs)
TOKENIZERS = ("local", "remote")
LOCAL_TARGET_MS = 2.0  # issue 16: p50 added latency with a local tokenizer
REMOTE_SLACK_MS = 1.0  # issue 16: at most one /tokenize round trip + 1 ms with a remote one


@dataclass(frozen=True)
class LatencyOptions:
    rate: float = 16.0  # requests per second, Poisson
    requests: int = 320  # timed requests per target
    policies: tuple[str, ...] = (
        PolicyName.KV_AWARE,
        PolicyName.ROUND_ROBIN,
        PolicyName.LEAST_LOADED,
    )
    tokenizers: tuple[str, ...] = TOKENIZERS
    prompt_tokens: int = 1024  # half a shared prefix, half the request's own
    max_tokens: int = 4
    rounds: int = 2  # every target once a round; its rows pool the rounds
    seed: int = 0
    vs: str | None = None  # "vllm-router": also vllm-router round_robin over the same engines
    peers_venv: Path | None = None  # where vllm-router is (None: .venv-peers, bench/peers.py)
    before_src: Path | None = None  # another kvroute's src/ (an older commit), run the same way
    out_dir: Path = DEFAULT_OUT_DIR


def add_arguments(p: argparse._ActionsContainer) -> None:
    d = LatencyOptions()
    p.add_argument(
        "--latency-rate", type=float, default=d.rate, help="requests per second (Poisson)"
    )
    p.add_argument(
        "--latency-requests",
        type=int,
        default=d.requests,
        help="timed requests per target (--size smoke: 24)",
    )
    p.add_argument(
        "--latency-policies",
        default=",".join(d.policies),
        help=f"kvroute policies, comma-separated, of: {', '.join(PolicyName)}",
    )
    p.add_argument(
        "--latency-tokenizers",
        default=",".join(d.tokenizers),
        help="kvroute tokenizer modes, comma-separated, of: local (a tokenizer.json in the "
        "gateway), remote (the engines' /tokenize)",
    )
    p.add_argument(
        "--latency-prompt-tokens",
        type=int,
        default=d.prompt_tokens,
        help="prompt length in tokens (half shared by a group of requests, half unique)",
    )
    p.add_argument(
        "--latency-rounds",
        type=int,
        default=d.rounds,
        help="rounds, each measuring every target in turn with its share of the requests "
        "(--size smoke: 1)",
    )
    p.add_argument(
        "--latency-before-src",
        type=Path,
        metavar="DIR",
        help="also run the kvroute whose sources are in DIR (e.g. an older commit's src/, C "
        "extensions built) the same way, for a before/after in one run (default: none)",
    )


def options(args: argparse.Namespace) -> LatencyOptions:
    policies = tuple(p for p in str(args.latency_policies).split(",") if p)
    tokenizers = tuple(t for t in str(args.latency_tokenizers).split(",") if t)
    if not policies or set(policies) - set(PolicyName):
        raise ValueError(
            f"--latency-policies: expected some of {', '.join(PolicyName)}, got {policies}"
        )
    if not tokenizers or set(tokenizers) - set(TOKENIZERS):
        raise ValueError(f"--latency-tokenizers: expected local, remote, got {tokenizers}")
    smoke = args.size == "smoke"
    requests = 24 if smoke else args.latency_requests
    rounds = 1 if smoke else args.latency_rounds
    if args.latency_rate <= 0 or args.latency_prompt_tokens < 2 or not 1 <= rounds <= requests:
        raise ValueError(
            "--latency-rate: expected > 0, --latency-prompt-tokens >= 2, --latency-rounds from "
            "1 to --latency-requests"
        )
    if args.vs not in (None, "vllm-router"):
        raise ValueError(f"--vs: latency compares with vllm-router only, got {args.vs}")
    return LatencyOptions(
        rate=args.latency_rate,
        requests=requests,
        rounds=rounds,
        policies=policies,
        tokenizers=tokenizers,
        prompt_tokens=args.latency_prompt_tokens,
        vs=args.vs,
        peers_venv=args.peers_venv,
        before_src=args.latency_before_src,
        out_dir=args.out_dir,
    )


# --- the workload -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    at: float  # seconds after the first
    path: str  # /v1/completions or /v1/chat/completions
    body: bytes
    tokenize_body: bytes  # the same prompt for an engine's /tokenize


def _workload(opts: LatencyOptions, sim: SimTokenizer, tag: str, n: int) -> list[_Request]:
    """`n` requests at Poisson arrival times, alternately completions and chats; prompt i is one
    of PREFIXES shared prefixes plus a part no other request has (`tag` keeps warm-up apart)."""
    half = opts.prompt_tokens // 2
    prefixes = [sim.make_text(half, f"prefix-{k}") for k in range(PREFIXES)]
    out = []
    for i, at in enumerate(poisson_arrivals(n, opts.rate, opts.seed)):
        prefix = prefixes[i % PREFIXES]
        own = sim.make_text(opts.prompt_tokens - half, f"{tag}-{opts.seed}-{i}")
        if i % 2 == 0:
            body: dict[str, Any] = {"model": MODEL, "prompt": f"{prefix} {own}"}
            tokenize: dict[str, Any] = {"model": MODEL, "prompt": body["prompt"]}
            path = "/v1/completions"
        else:
            messages = [{"role": "system", "content": prefix}, {"role": "user", "content": own}]
            body = {"model": MODEL, "messages": messages}
            tokenize = {"model": MODEL, "messages": messages}
            path = "/v1/chat/completions"
        body["max_tokens"] = opts.max_tokens
        out.append(_Request(at, path, json.dumps(body).encode(), json.dumps(tokenize).encode()))
    return out


# --- measuring ----------------------------------------------------------------------------------


@dataclass
class _Samples:
    latency_ms: list[float] = field(default_factory=list)
    added_ms: list[float] = field(default_factory=list)  # latency - the engine's own e2e
    engine_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


def _quantiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    if len(values) == 1:
        return {"p50": values[0], "p90": values[0], "p99": values[0]}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(cuts[49], 3), "p90": round(cuts[89], 3), "p99": round(cuts[98], 3)}


async def _send(
    http: httpx.AsyncClient,
    requests: Sequence[_Request],
    url_for: Any,
    samples: _Samples,
    *,
    generate: bool,
) -> None:
    """Each request at its arrival time (not after the previous answer), to `url_for(i,
    request)`, into `samples`. `generate`: the engine's own e2e comes with the answer
    (sim/server.py's `sim.e2e_ms`); else (a /tokenize call) the whole latency counts."""

    async def one(i: int, request: _Request) -> None:
        sent = time.perf_counter()
        try:
            reply = await http.post(
                url_for(i, request),
                content=request.body if generate else request.tokenize_body,
                headers={"content-type": "application/json"},
            )
        except httpx.HTTPError as exc:
            samples.error(type(exc).__name__)
            return
        latency_ms = (time.perf_counter() - sent) * 1000.0
        if reply.status_code != 200:
            samples.error(str(reply.status_code))
            return
        engine_ms = 0.0
        if generate:
            engine_ms = float(reply.json()["sim"]["e2e_ms"])
            samples.engine_ms.append(engine_ms)
        samples.latency_ms.append(latency_ms)
        samples.added_ms.append(latency_ms - engine_ms)

    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i, request in enumerate(requests):
        # Pacing of the load generator (not a synchronisation): the next request's slot.
        await asyncio.sleep(max(0.0, start + request.at - loop.time()))
        tasks.append(asyncio.create_task(one(i, request)))
    await asyncio.gather(*tasks)


async def _tokenize_calls(http: httpx.AsyncClient, engines: Sequence[str]) -> int:
    """POST /tokenize calls the simulated engines answered so far (/sim/state)."""
    total = 0
    for url in engines:
        total += int((await http.get(f"{url}/sim/state")).json()["tokenize_requests"])
    return total


def _gateway_metrics(text: str) -> dict[str, float]:
    """Tokenizer figures from a gateway's /metrics: tokenizations and seconds per mode, cache
    and piece lookups per result (absent from an older kvroute)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        for prefix in (
            "kvroute_tokenize_seconds_count",
            "kvroute_tokenize_seconds_sum",
            "kvroute_tokenizer_cache_lookups_total",
            "kvroute_tokenizer_piece_lookups_total",
        ):
            if line.startswith(prefix + "{"):
                label = line[len(prefix) :].split(" ", 1)[0]
                out[prefix.removeprefix("kvroute_") + label] = float(line.rsplit(" ", 1)[1])
    return out


@dataclass
class _Target:
    """One row: where its requests go, and what they measured over every round."""

    name: str
    policy: str | None = None
    tokenizer: str | None = None
    src: Path | None = None  # kvroute: the sources it runs from (None: this one)
    samples: _Samples = field(default_factory=_Samples)
    tokenize_calls: int = 0  # the engines answered while its timed requests ran
    cpu_s: float = 0.0  # the router process's CPU time while its timed requests ran
    gateway: dict[str, float] = field(default_factory=dict)  # kvroute's tokenizer metrics

    @property
    def kind(self) -> str:
        return self.name.split(" ")[0]  # engine, kvroute, vllm-router

    def row(self) -> dict[str, Any]:
        s = self.samples
        return {
            "target": self.name,
            "policy": self.policy,
            "tokenizer": self.tokenizer,
            "requests": len(s.latency_ms),
            "errors": s.errors,
            "added_ms": _quantiles(s.added_ms),
            "latency_ms": _quantiles(s.latency_ms),
            "engine_e2e_ms": _quantiles(s.engine_ms),
            "router_tokenize_calls": self.tokenize_calls,
            **({"gateway": self.gateway} if self.kind == "kvroute" else {}),
            "router_tokenize_mean_ms": self._tokenize_mean_ms(),
            "router_cpu_ms_per_request": round(self.cpu_s * 1000.0 / len(s.latency_ms), 3)
            if self.kind != "engine" and s.latency_ms
            else None,
        }

    def _tokenize_mean_ms(self) -> float | None:
        """The gateway's own time per tokenization (kvroute_tokenize_seconds, every mode)."""
        count = sum(v for k, v in self.gateway.items() if k.startswith("tokenize_seconds_count"))
        total = sum(v for k, v in self.gateway.items() if k.startswith("tokenize_seconds_sum"))
        return round(total / count * 1000.0, 3) if count else None


async def _measure(
    http: httpx.AsyncClient,
    target: _Target,
    router: tuple[str, int] | None,
    engines: Sequence[str],
    warmup: Sequence[_Request],
    timed: Sequence[_Request],
) -> None:
    """Warm-up, then the timed requests through `router` (its URL and pid), or straight to the
    engines in turn (the generation, or its prompt to /tokenize for `engine /tokenize`)."""
    url = None if router is None else router[0]
    generate = target.name != "engine /tokenize"

    def url_for(i: int, request: _Request) -> str:
        if url is not None:
            return url + request.path
        return engines[i % len(engines)] + (request.path if generate else "/tokenize")

    await _send(http, warmup, url_for, _Samples(), generate=generate)
    before = await _tokenize_calls(http, engines)
    errors = sum(target.samples.errors.values())
    sent = len(target.samples.latency_ms) + errors
    cpu = 0.0 if router is None else cpu_seconds(router[1])
    await _send(http, timed, url_for, target.samples, generate=generate)
    if router is not None:
        target.cpu_s += cpu_seconds(router[1]) - cpu
    calls = await _tokenize_calls(http, engines) - before
    if not generate:  # its own calls
        calls -= len(target.samples.latency_ms) + sum(target.samples.errors.values()) - sent
    target.tokenize_calls += calls


# --- the systems --------------------------------------------------------------------------------


async def _start_sim(workdir: Path) -> tuple[ChildProcess, list[str]]:
    """`kvroute sim` in its own process (its event loop is not the client's); its engines' URLs
    once its fleet file is written."""
    sim = ChildProcess("sim", workdir / "sim.log")
    fleet_file = workdir / "fleet.yaml"
    fleet_file.unlink(missing_ok=True)  # its appearance is the signal
    cmd = [sys.executable, "-m", "kvroute.cli", "sim", "--engines", str(ENGINES)]
    await sim.spawn([*cmd, "--model", MODEL, "--fleet-out", str(fleet_file)])
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not fleet_file.exists():  # written once every engine serves
        if sim.exited() or time.monotonic() > deadline:
            await sim.stop()
            raise RuntimeError(f"kvroute sim did not start: {sim.tail()}")
        await asyncio.sleep(0.1)
    entries = yaml.safe_load(fleet_file.read_text())["engines"]
    return sim, [str(e["url"]) for e in entries]


# --- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Files:
    workdir: Path
    tokenizer_json: Path
    template: Path
    engines: list[str]
    vllm_router: VllmRouterPeer | None


@contextlib.asynccontextmanager
async def _serving(
    http: httpx.AsyncClient, target: _Target, opts: LatencyOptions, files: _Files
) -> AsyncIterator[tuple[str, int] | None]:
    """The target's router started in its own process (and stopped after): its URL and pid;
    None for the engines themselves."""
    if target.kind == "engine":
        yield None
        return
    if target.kind == "vllm-router":
        assert files.vllm_router is not None
        router = VllmRouter(files.vllm_router, LOAD_POLICY, files.workdir)
        workers = [RouterWorker(url, ()) for url in files.engines]
        try:
            url = await router.start(workers, model=MODEL, block_size=16)
            assert router.process.proc is not None
            yield url, router.process.proc.pid
        finally:
            await router.stop()
        return
    gateway = GatewayProcess(0, files.workdir)
    settings = {"policy": str(target.policy)}
    if target.tokenizer == "local":
        settings["tokenizer_path"] = str(files.tokenizer_json)
        settings["chat_template_path"] = str(files.template)
    env = {} if target.src is None else {"PYTHONPATH": str(target.src)}
    try:
        await gateway.start(files.workdir / "fleet.yaml", settings, env)
        await gateway.wait_ready(http)
        assert gateway.proc is not None
        yield gateway.url, gateway.proc.pid
        for key, value in _gateway_metrics((await http.get(f"{gateway.url}/metrics")).text).items():
            target.gateway[key] = target.gateway.get(key, 0.0) + value
    finally:
        await gateway.stop()


def _targets(opts: LatencyOptions, peer: VllmRouterPeer | None, notes: list[str]) -> list[_Target]:
    """The rows in the order each round measures them: the engines directly, their /tokenize,
    then per policy and tokenizer this kvroute beside the one of `before_src`, vllm-router."""
    targets = [_Target("engine (direct)"), _Target("engine /tokenize")]
    for policy in opts.policies:
        for mode in opts.tokenizers:
            targets.append(_Target("kvroute", policy, mode))
            if opts.before_src is not None:
                targets.append(_Target("kvroute (before)", policy, mode, opts.before_src))
    if peer is not None:
        targets.append(_Target("vllm-router", LOAD_POLICY))
    return targets


def _vllm_router(opts: LatencyOptions, notes: list[str]) -> VllmRouterPeer | None:
    if opts.vs != "vllm-router":
        return None
    try:
        return find_vllm_router(opts.peers_venv)
    except PeerMissing as exc:
        notes.append(f"vllm-router row skipped: {exc}")
        return None


async def _run(opts: LatencyOptions, workdir: Path) -> dict[str, Any]:
    """Every target once per round, each round with requests of its own (the same for every
    target of the round), so drift on a shared machine spreads over all rows."""
    sim_tokenizer = SimTokenizer()
    tokenizer_json, template = write_sim_tokenizer(sim_tokenizer, workdir / "tokenizer")
    notes: list[str] = []
    peer = _vllm_router(opts, notes)
    targets = _targets(opts, peer, notes)
    sim, engines = await _start_sim(workdir)
    files = _Files(workdir, tokenizer_json, template, engines, peer)
    per_round = -(-opts.requests // opts.rounds)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=60, limits=limits) as http:
            for r in range(opts.rounds):
                n = min(per_round, opts.requests - r * per_round)
                timed = _workload(opts, sim_tokenizer, f"timed-{r}", n)
                for i, target in enumerate(targets):
                    warmup = _workload(opts, sim_tokenizer, f"warmup-{r}-{i}", WARMUP)
                    async with _serving(http, target, opts, files) as router:
                        await _measure(http, target, router, engines, warmup, timed)
    finally:
        await sim.stop()
    return _summarise(opts, targets, notes)


def _summarise(opts: LatencyOptions, targets: list[_Target], notes: list[str]) -> dict[str, Any]:
    """Each row's overhead: its p50 added latency minus that of the engines reached directly
    and, for kvroute, the issue's target."""
    rtt = _quantiles(targets[1].samples.latency_ms)
    rows = [t.row() for t in targets if t.name != "engine /tokenize"]
    baseline = rows[0]["added_ms"]["p50"] or 0.0
    rtt_p50 = rtt["p50"] or 0.0
    for row in rows:
        p50 = row["added_ms"]["p50"]
        row["overhead_p50_ms"] = None if p50 is None else round(p50 - baseline, 3)
        if row["target"].startswith("kvroute"):
            target = LOCAL_TARGET_MS if row["tokenizer"] == "local" else rtt_p50 + REMOTE_SLACK_MS
            row["target_p50_ms"] = round(target, 3)
            row["meets_target"] = p50 is not None and p50 - baseline <= target
    return {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "direct_added_p50_ms": baseline,
        "tokenize_rtt_ms": rtt,
        "rows": rows,
        "notes": notes,
    }


def _label(row: dict[str, Any]) -> str:
    parts = [row["target"], row["policy"], row["tokenizer"]]
    return " ".join(str(p) for p in parts if p)


def run(opts: LatencyOptions) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvroute-latency-") as tmp:
        result = asyncio.run(_run(opts, Path(tmp)))
    rows = result["rows"]
    print_table(
        f"kvroute bench latency: added latency (client - engine e2e), {opts.requests} requests "
        f"at {opts.rate:g}/s Poisson, {opts.prompt_tokens}-token prompts, {ENGINES} simulated "
        f"engines; /tokenize round trip p50 {result['tokenize_rtt_ms']['p50']} ms",
        [
            "target",
            "requests",
            "errors",
            "added p50 ms",
            "p90 ms",
            "p99 ms",
            "overhead p50 ms",
            "target ms",
            "/tokenize calls",
            "its tokenize ms",
            "its CPU ms/request",
        ],
        [
            [
                _label(r),
                r["requests"],
                sum(r["errors"].values()),
                r["added_ms"]["p50"],
                r["added_ms"]["p90"],
                r["added_ms"]["p99"],
                r["overhead_p50_ms"],
                "-"
                if "target_p50_ms" not in r
                else f"{r['target_p50_ms']} {'met' if r['meets_target'] else 'MISSED'}",
                r["router_tokenize_calls"],
                r["router_tokenize_mean_ms"] or "-",
                r["router_cpu_ms_per_request"] or "-",
            ]
            for r in rows
        ],
    )
    for note in result["notes"]:
        print(note)
    print(f"wrote {save_json('latency', result, opts.out_dir)}")
    bar_chart(
        opts.out_dir / "latency.png",
        "router overhead: p50 added latency minus the engines' own (ms)",
        [_label(r) for r in rows],
        [
            ("overhead p50 ms", [max(0.0, r["overhead_p50_ms"] or 0.0) for r in rows]),
            ("router CPU ms per request", [r["router_cpu_ms_per_request"] or 0.0 for r in rows]),
        ],
    )
    return result
