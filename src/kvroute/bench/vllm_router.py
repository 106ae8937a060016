"""vllm-router (the vLLM project's Rust router, `make bench-peers`) in front of a simulated fleet
for `kvroute bench trace|latency --vs vllm-router`: its command line, start, readiness, stop."""

# vllm-router 0.1.17 is started as `python -m vllm_router.launch_router` from `.venv-peers`.
# Facts about it this module relies on, each pinned by tests/e2e/bench/test_trace_vs.py:
# - `--policy kv_aware` consumes vLLM's ZMQ KV events of each worker given as
#   `--kv-event-source WORKER_URL=ENDPOINT[,ENDPOINT...]` (one endpoint per DP rank, in rank
#   order), with `--kv-event-replay-source` alike, `--kv-event-block-size` and
#   `--kv-event-model` (required with static sources). It subscribes with vLLM's default topic
#   "" and has no flag for another, so the engines must publish with topic "".
# - It indexes the token ids of BlockStored events, not the engine's hashes (the simulator's
#   hashes are not vLLM's, and its kv_aware still finds the prefixes).
# - A token-id prompt is routed on its ids, which is what the trace bench sends. (A text prompt
#   is rendered by a worker, `POST /v1/completions/render` or the chat form, then `/tokenize`
#   if that fails: seen in its debug log, not relied on here; the simulator serves all three.)
# - `--policy cache_aware` routes by an approximate prefix tree of the requests it sent.
# - It answers `GET /health` once every worker passed its health check, and relays the
#   workers' response headers (x-sim-ttft-ms) and bodies (sim.engine).

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx

from kvroute.bench.peers import PeerMissing, find_peer
from kvroute.bench.processes import READY_TIMEOUT_S, ChildProcess, free_port
from kvroute.sim import SimFleet

__all__ = [
    "LOAD_POLICY",
    "PEER",
    "POLICIES",
    "VLLM_ROUTER_VERSION",
    "PeerMissing",
    "RouterWorker",
    "VllmRouter",
    "VllmRouterPeer",
    "find_vllm_router",
    "peer_run_name",
    "router_command",
    "workers_of",
]

VLLM_ROUTER_VERSION: Final = "0.1.17"
PEER: Final = "vllm-router"
POLICIES: Final = ("kv_aware", "cache_aware")
"""The policies `--vs vllm-router` runs: event-driven, and approximate (its own tree)."""
LOAD_POLICY: Final = "round_robin"
"""The one `kvroute bench latency --vs vllm-router` runs: no prompt read, no events."""


def peer_run_name(policy: str) -> str:
    """A peer run's name in the table and trace.json: vllm-router:kv_aware."""
    return f"{PEER}:{policy}"


@dataclass(frozen=True)
class VllmRouterPeer:
    python: Path
    version: str


def find_vllm_router(venv: Path | None = None) -> VllmRouterPeer:
    """vllm-router in `venv` (default: `.venv-peers` here, then in the source checkout);
    PeerMissing with the fix when it is not there."""
    peer = find_peer(
        venv,
        Path("vllm_router/launch_router.py"),
        "vllm_router",
        f"vllm-router (vllm-router=={VLLM_ROUTER_VERSION})",
    )
    return VllmRouterPeer(python=peer.python, version=peer.version)


@dataclass(frozen=True)
class RouterWorker:
    """One engine as vllm-router is told about it: its URL and its event (and replay)
    endpoints, one per DP rank in rank order."""

    url: str
    events: tuple[str, ...]
    replay: tuple[str, ...] = ()


def workers_of(fleet: SimFleet) -> list[RouterWorker]:
    """The workers of a started simulated fleet."""
    return [
        RouterWorker(
            url=e.url,
            events=tuple(e.events_endpoints),
            replay=tuple(r for r in e.replay_endpoints if r is not None),
        )
        for e in fleet.engines
    ]


def router_command(
    peer: VllmRouterPeer,
    policy: str,
    workers: Sequence[RouterWorker],
    *,
    model: str,
    block_size: int,
    port: int,
    metrics_port: int,
    host: str = "127.0.0.1",
) -> list[str]:
    """vllm-router's command line for `policy` over `workers`; kv_aware gets every worker's
    event sources (and replay sources when all ranks have one). ValueError for an unknown
    policy, no worker, or a kv_aware worker without event endpoints."""
    if policy not in (*POLICIES, LOAD_POLICY):
        raise ValueError(
            f"vllm-router policy: expected one of {', '.join((*POLICIES, LOAD_POLICY))}, "
            f"got {policy!r}"
        )
    if not workers:
        raise ValueError("vllm-router: expected at least one worker, got none")
    cmd = [
        str(peer.python),
        "-m",
        "vllm_router.launch_router",
        "--host",
        host,
        "--port",
        str(port),
        "--prometheus-host",
        host,
        "--prometheus-port",
        str(metrics_port),
        "--policy",
        policy,
        "--worker-urls",
        *(w.url for w in workers),
        # Workers are up before the router starts; check them at once, not after 30 s.
        "--worker-startup-check-interval",
        "1",
        "--log-level",
        "warning",
    ]
    if policy == "kv_aware":
        for w in workers:
            if not w.events:
                raise ValueError(f"vllm-router kv_aware: worker {w.url} has no event endpoint")
            cmd += ["--kv-event-source", f"{w.url}={','.join(w.events)}"]
            if len(w.replay) == len(w.events):
                cmd += ["--kv-event-replay-source", f"{w.url}={','.join(w.replay)}"]
        cmd += ["--kv-event-block-size", str(block_size), "--kv-event-model", model]
    return cmd


class VllmRouter:
    """vllm-router as a child process with its log in `workdir`: `start(...)` returns its URL
    once it answers `/health`; `stop()` ends it."""

    def __init__(self, peer: VllmRouterPeer, policy: str, workdir: Path) -> None:
        self.peer = peer
        self.policy = policy
        self.process = ChildProcess(
            peer_run_name(policy), workdir / f"vllm-router-{policy}-{time.monotonic_ns()}.log"
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def start(self, workers: Sequence[RouterWorker], *, model: str, block_size: int) -> str:
        cmd = router_command(
            self.peer,
            self.policy,
            workers,
            model=model,
            block_size=block_size,
            port=self.port,
            metrics_port=free_port(),
        )
        await self.process.spawn(cmd)
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise
        return self.url

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as http:
            while True:
                if self.process.exited():
                    raise RuntimeError(f"vllm-router exited at start: {self.process.tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{self.url}/health")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vllm-router not ready: {self.process.tail()}")
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        await self.process.stop()
