"""One simulated vLLM engine: a scheduler, block pool and event publisher per DP rank, driven by
an asyncio step loop that maps simulated time to wall time (wall = sim / speed)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvroute.errors import EngineError
from kvroute.events.curve import CurveKeyPair
from kvroute.events.publisher import ZmqEventPublisher
from kvroute.events.vllm_events import VllmBlockStored, VllmEvent, VllmEventBatch
from kvroute.sim.scheduler import SchedulerConfig, SimRequest, SimScheduler
from kvroute.sim.tokenizer import SimTokenizer

__all__ = ["Generation", "SimConfig", "SimEngine"]


@dataclass
class SimConfig:
    """Engine model and wire settings; defaults model an 8B model on one H100-class GPU."""

    block_size: int = 16
    num_gpu_blocks: int = 8192
    max_num_seqs: int = 64
    prefill_tok_per_s: float = 16_000.0
    decode_step_s: float = 0.012
    speed: float = 1.0  # simulated seconds per wall second; larger = faster
    release: str = "0.33.0"
    bytes_hashes: bool = False
    topic: str = "kv"
    buffer_steps: int = 10_000
    replay: bool = True
    # A CURVE key pair (events.curve): publish as a CURVE server, as a `kvroute relay` would.
    curve: CurveKeyPair | None = None
    max_model_len: int = 32_768
    default_max_tokens: int = 16
    vocab_size: int = 32_000
    # Prefill tokens per step at most (chunked prefill, sim/scheduler.py); None: whole prompts.
    max_num_batched_tokens: int | None = None

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            block_size=self.block_size,
            num_gpu_blocks=self.num_gpu_blocks,
            max_num_seqs=self.max_num_seqs,
            prefill_tok_per_s=self.prefill_tok_per_s,
            decode_step_s=self.decode_step_s,
            bytes_hashes=self.bytes_hashes,
            max_num_batched_tokens=self.max_num_batched_tokens,
        )


_END = object()


class Generation:
    """A request in flight: its output tokens arrive (in wall time) as the steps run."""

    def __init__(self, request: SimRequest, rank: int) -> None:
        self.request = request
        self.rank = rank
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._engine: SimEngine | None = None

    def _push(self, item: Any) -> None:
        self._queue.put_nowait(item)

    async def tokens(self) -> AsyncIterator[int]:
        """Output token ids as they are produced; raises EngineError if the engine restarts."""
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def result(self) -> list[int]:
        return [t async for t in self.tokens()]

    def cancel(self) -> None:
        """The client went away: free the request's blocks."""
        if self._engine is not None and not self.request.finished:
            self._engine._ranks[self.rank].scheduler.abort(self.request)

    @property
    def engine_name(self) -> str:
        return self._engine.name if self._engine is not None else ""

    @property
    def ttft_ms(self) -> float | None:
        t = self.request.ttft
        return None if t is None else t * 1000.0

    @property
    def e2e_ms(self) -> float | None:
        t = self.request.e2e
        return None if t is None else t * 1000.0


class _Rank:
    """Scheduler + publisher + step loop of one DP rank."""

    def __init__(self, engine: SimEngine, rank: int, publisher: ZmqEventPublisher) -> None:
        self.engine = engine
        self.rank = rank
        self.scheduler = SimScheduler(engine.config.scheduler_config())
        self.publisher = publisher
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.generations: dict[int, Generation] = {}  # id(request) -> generation
        self.duplicate_stores = False
        self.batches_published = 0
        # Requests the step being waited out finishes: the scheduler is already past them, but
        # until that step's end in wall time their clients still wait (so /metrics counts them).
        self.finishing = 0

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop(), name=f"sim-{self.engine.name}-{self.rank}")

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.finishing = 0

    @property
    def num_running(self) -> int:
        """Requests running as a client sees them (vLLM's `num_requests_running`)."""
        return self.scheduler.num_running + self.finishing

    def submit(self, gen: Generation) -> None:
        self.scheduler.add(gen.request)
        self.generations[id(gen.request)] = gen
        self.wake.set()

    def load(self) -> int:
        return self.scheduler.num_running + self.scheduler.num_waiting

    def fail_all(self, requests: Sequence[SimRequest], why: str) -> None:
        for req in requests:
            gen = self.generations.pop(id(req), None)
            if gen is not None:
                gen._push(EngineError(why))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        speed = self.engine.config.speed
        t0 = self.engine.t0
        while True:
            out = self.scheduler.step()
            if out is None:
                self.wake.clear()
                await self.wake.wait()
                continue
            delay = t0 + out.end / speed - loop.time()
            self.finishing = len(out.finished)
            # Yield even when behind, so HTTP handlers run between steps.
            await asyncio.sleep(delay if delay > 0 else 0)
            self.finishing = 0
            if out.events:
                self._publish(out.events)
            for req in out.advanced:
                gen = self.generations.get(id(req))
                if gen is None:
                    continue
                gen._push(req.output[req.emitted - 1])
            for req in out.finished:
                gen = self.generations.pop(id(req), None)
                if gen is not None:
                    gen._push(_END)
                    self.engine._observe_finished(req, self.rank)

    def _publish(self, events: list[VllmEvent]) -> None:
        if self.duplicate_stores:
            doubled: list[VllmEvent] = []
            for ev in events:
                doubled.append(ev)
                if isinstance(ev, VllmBlockStored):
                    doubled.append(ev)
            events = doubled
        self.publisher.publish(VllmEventBatch(time.time(), events, self.rank))
        self.batches_published += 1


class SimEngine:
    """One simulated engine (all its DP ranks). Build with `SimEngine.create(...)`, then
    `start()`; the HTTP side lives in `kvroute.sim.server`."""

    def __init__(
        self,
        name: str,
        model: str,
        *,
        config: SimConfig,
        tokenizer: SimTokenizer,
        publishers: Sequence[ZmqEventPublisher],
        lora: Sequence[str] = (),
        ranks: Sequence[int] | None = None,
    ) -> None:
        if not publishers:
            raise ValueError("publishers: expected one per DP rank, got none")
        self.name = name
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.lora = tuple(lora)
        self.lora_ids = {n: i + 1 for i, n in enumerate(self.lora)}
        rank_ids = list(ranks) if ranks is not None else list(range(len(publishers)))
        self.t0 = 0.0
        self._ranks = [_Rank(self, r, p) for r, p in zip(rank_ids, publishers, strict=True)]
        self._ids = itertools.count()
        self.url = ""  # set once the HTTP server listens
        self.alive = False
        # POST /tokenize calls answered: what a router's tokenization costs the engine.
        self.tokenize_requests = 0
        self.ttft_observer: list[Callable[[float, int], None]] = []  # (ttft seconds, rank)

    @property
    def ranks(self) -> list[int]:
        return [r.rank for r in self._ranks]

    @property
    def events_endpoints(self) -> list[str]:
        return [r.publisher.endpoint for r in self._ranks]

    @property
    def replay_endpoints(self) -> list[str | None]:
        return [r.publisher.replay_endpoint for r in self._ranks]

    def rank_state(self, rank: int) -> _Rank:
        for r in self._ranks:
            if r.rank == rank:
                return r
        raise KeyError(rank)

    def all_ranks(self) -> list[_Rank]:
        return list(self._ranks)

    def sim_now(self) -> float:
        return (asyncio.get_running_loop().time() - self.t0) * self.config.speed

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind every rank's publisher and start the step loops."""
        self.t0 = asyncio.get_running_loop().time()
        for r in self._ranks:
            await r.publisher.start()
        for r in self._ranks:
            r.start()
        self.alive = True

    async def close(self) -> None:
        self.alive = False
        for r in self._ranks:
            await r.stop()
            r.fail_all([*r.scheduler.running, *r.scheduler.waiting], f"{self.name} shut down")
            await r.publisher.close()

    async def restart(self, rank: int | None = None) -> None:
        """Process restart: pools emptied, requests lost, seq back to 0, no AllBlocksCleared."""
        for r in self._ranks:
            if rank is not None and r.rank != rank:
                continue
            await r.stop()
            lost = r.scheduler.restart()
            r.fail_all(lost, f"{self.name} restarted")
            r.generations.clear()
            await r.publisher.restart()
            r.start()

    def reset_prefix_cache(self) -> bool:
        """Every rank drops its prefix cache (AllBlocksCleared goes out with its next step)."""
        if any(r.scheduler.pool.num_used for r in self._ranks):
            return False
        for r in self._ranks:
            r.scheduler.reset_prefix_cache()
        return True

    # -- requests ------------------------------------------------------------------------------
    def resolve_model(self, model: str | None) -> str | None:
        """The LoRA name a request's `model` selects (None = base); KeyError if not served."""
        if model is None or model == self.model:
            return None
        if model in self.lora_ids:
            return model
        raise KeyError(model)

    def submit(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        lora_name: str | None,
        *,
        rank: int | None = None,
    ) -> Generation:
        """Queue a request on `rank` or else the least-loaded rank; ValueError if it can never
        run (or names a rank this engine does not have)."""
        if not self.alive:
            raise EngineError(f"{self.name} is not running")
        if len(prompt) + max_tokens > self.config.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.config.max_model_len} tokens; "
                f"the request asks for {len(prompt)} prompt + {max_tokens} output tokens"
            )
        if rank is None:
            target = min(self._ranks, key=lambda r: (r.load(), r.rank))
        else:
            try:
                target = self.rank_state(rank)
            except KeyError:
                raise ValueError(
                    f"data parallel rank: expected one of {self.ranks}, got {rank}"
                ) from None
        request = SimRequest(
            request_id=f"{self.name}-{next(self._ids)}",
            prompt=list(prompt),
            output=self.tokenizer.generate(prompt, max_tokens),
            arrival=self.sim_now(),
            lora_name=lora_name,
            lora_id=None if lora_name is None else self.lora_ids[lora_name],
        )
        gen = Generation(request, target.rank)
        gen._engine = self
        target.submit(gen)
        return gen

    def _observe_finished(self, req: SimRequest, rank: int) -> None:
        if req.ttft is not None:
            for cb in self.ttft_observer:
                cb(req.ttft, rank)

    # -- ground truth --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """/sim/state: read from the block pools themselves."""
        ranks = []
        for r in self._ranks:
            pool = r.scheduler.pool
            ranks.append(
                {
                    "rank": r.rank,
                    "seq": r.publisher.next_seq - 1 if r.publisher.next_seq else None,
                    "next_seq": r.publisher.next_seq,
                    "running": r.scheduler.num_running,
                    "waiting": r.scheduler.num_waiting,
                    "num_gpu_blocks": pool.num_blocks,
                    "used_blocks": pool.num_used,
                    "pending_events": pool.pending_events,
                    "cached": [
                        {
                            "hash": _json_hash(b.hash),
                            "parent": None if b.parent is None else _json_hash(b.parent),
                            "lora_name": b.lora_name,
                            "medium": b.medium,
                        }
                        for b in pool.cached_blocks()
                    ],
                }
            )
        return {
            "engine": self.name,
            "model": self.model,
            "tokenize_requests": self.tokenize_requests,
            "ranks": ranks,
        }


def _json_hash(h: int | bytes) -> int | dict[str, str]:
    return {"hex": h.hex()} if isinstance(h, bytes) else h
