"""The step scheduler of one simulated engine DP rank, on a virtual clock: admission, prefix
hits, prefill and decode, block allocation, and one list of KV events per step."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from kvroute.events.vllm_events import VllmEvent
from kvroute.sim.block_pool import NONE_DIGEST, BlockPool

__all__ = ["SchedulerConfig", "SimRequest", "SimScheduler", "StepOutcome"]


@dataclass(frozen=True)
class SchedulerConfig:
    """The time model: a step costs prefill_tokens / prefill_tok_per_s + decode_step_s.

    `max_num_batched_tokens`: the prefill tokens one step computes at most (vLLM V1 chunks
    every prefill to its per-step token budget); None: each admitted prompt is prefilled whole
    in its admitting step. Decode tokens are not counted against it (one per running request
    and step; with token-scaled prompts they would take a budget scaled down with them).
    """

    block_size: int = 16
    num_gpu_blocks: int = 8192
    max_num_seqs: int = 64
    prefill_tok_per_s: float = 16_000.0
    decode_step_s: float = 0.012
    bytes_hashes: bool = False
    max_num_batched_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens: expected >= 1 or None, got {self.max_num_batched_tokens}"
            )


@dataclass(eq=False)
class SimRequest:
    """One request inside the scheduler. Times are simulated seconds."""

    request_id: str
    prompt: list[int]
    output: list[int]  # the tokens it will generate (deterministic; len = max_tokens)
    arrival: float
    lora_name: str | None = None
    lora_id: int | None = None
    # filled in by the scheduler
    cached_tokens: int = 0
    emitted: int = 0  # output tokens produced so far
    first_token_time: float | None = None
    finish_time: float | None = None
    aborted: bool = False
    _prompt_digests: list[bytes] | None = None
    _digests: list[bytes] = field(default_factory=list)  # digests of full blocks so far
    _block_ids: list[int] = field(default_factory=list)
    _num_cached_blocks: int = 0  # leading blocks entered into the prefix cache
    _num_computed: int = 0
    _reserved: int = 0  # blocks promised at admission, not yet allocated

    @property
    def max_tokens(self) -> int:
        return len(self.output)

    @property
    def finished(self) -> bool:
        return self.finish_time is not None or self.aborted

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival

    def total_tokens(self) -> int:
        """Tokens whose KV the request will have computed when it finishes (the last sampled
        token is never fed back)."""
        return len(self.prompt) + max(len(self.output) - 1, 0)

    def token_at(self, pos: int) -> int:
        n = len(self.prompt)
        return self.prompt[pos] if pos < n else self.output[pos - n]


@dataclass
class StepOutcome:
    """What one step did, at simulated time `end` (= start + cost)."""

    start: float
    end: float
    prefill_tokens: int
    events: list[VllmEvent]
    advanced: list[SimRequest]  # requests that produced one output token in this step
    finished: list[SimRequest]


class SimScheduler:
    """FIFO admission up to `max_num_seqs`; uncached prefill in the admitting step, or in chunks
    of the step's token budget (`max_num_batched_tokens`: requests part-way through their
    prefill first, in admission order, then new ones while budget is left), the first token at
    the end of the step that completes it; one decode token per request per step after.

    Admission promises a request every block it will ever need (so nothing is preempted);
    blocks are taken from the pool only when tokens need them, so eviction happens as late
    as in vLLM.
    """

    def __init__(self, config: SchedulerConfig, *, clock: float = 0.0) -> None:
        self.config = config
        self.pool = BlockPool(
            config.num_gpu_blocks, config.block_size, bytes_hashes=config.bytes_hashes
        )
        self.clock = clock
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self._reserved = 0
        self._ids = itertools.count()
        # counters for /metrics
        self.prefix_queries_tokens = 0
        self.prefix_hit_tokens = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.finished_total = 0

    # -- requests ------------------------------------------------------------------------------
    def fits(self, prompt_len: int, max_tokens: int) -> bool:
        """Whether a request can ever run in this pool."""
        total = prompt_len + max(max_tokens - 1, 0)
        return -(-total // self.config.block_size) <= self.pool.num_blocks

    def add(self, request: SimRequest) -> None:
        if not request.prompt:
            raise ValueError("prompt: expected at least one token, got none")
        if not request.output:
            raise ValueError("max_tokens: expected >= 1, got 0")
        bad = next((t for t in request.prompt if not 0 <= t < 1 << 32), None)
        if bad is not None:
            raise ValueError(f"prompt: token ids must be in [0, 2**32), got {bad}")
        if not self.fits(len(request.prompt), len(request.output)):
            raise ValueError(
                f"request needs more than the {self.pool.num_blocks} KV blocks of this engine"
            )
        self.waiting.append(request)

    def abort(self, request: SimRequest) -> None:
        """Drop a request (client went away): free its blocks and its promise."""
        if request.finished:
            return
        request.aborted = True
        if request in self.waiting:
            self.waiting.remove(request)
        elif request in self.running:
            self.running.remove(request)
            self._release(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> StepOutcome | None:
        """Run one step from `self.clock`; None when there is nothing to do."""
        if not self.running:
            if not self.waiting:
                return None
            # Idle engine: time jumps to the next arrival.
            self.clock = max(self.clock, min(r.arrival for r in self.waiting))
        start = self.clock
        cfg = self.config
        left = cfg.max_num_batched_tokens  # prefill tokens this step may still compute
        decoding = [r for r in self.running if r._num_computed >= len(r.prompt)]
        prefilling = [r for r in self.running if r._num_computed < len(r.prompt)]
        prefill_tokens = 0
        work: list[SimRequest] = []  # requests whose KV grows this step
        advanced: list[SimRequest] = []  # requests that emit a token this step
        for req in decoding:
            req._num_computed += 1
            work.append(req)
            advanced.append(req)

        def prefill(req: SimRequest) -> None:
            nonlocal left, prefill_tokens
            todo = len(req.prompt) - req._num_computed
            chunk = todo if left is None else min(todo, left)
            if chunk <= 0:
                return
            req._num_computed += chunk
            prefill_tokens += chunk
            if left is not None:
                left -= chunk
            work.append(req)
            if req._num_computed >= len(req.prompt):
                advanced.append(req)

        for req in prefilling:
            prefill(req)
        admitted = self._admit(start, left)
        for req in admitted:
            req._num_computed = req.cached_tokens
            prefill(req)
        if not work:
            return None  # cannot happen: an idle pool always fits the head request
        # Allocation first (evictions precede stores within a step), then caching.
        for req in work:
            need = -(-req._num_computed // cfg.block_size) - len(req._block_ids)
            if need > 0:
                req._block_ids.extend(self.pool.allocate(need))
                req._reserved -= need
                self._reserved -= need
        for req in work:
            self._cache_full_blocks(req)

        cost = prefill_tokens / cfg.prefill_tok_per_s + cfg.decode_step_s
        end = start + cost
        self.clock = end
        finished = []
        for req in advanced:
            if req.first_token_time is None:
                req.first_token_time = end
            req.emitted += 1
            self.generation_tokens_total += 1
            if req.emitted >= len(req.output):
                req.finish_time = end
                finished.append(req)
        for req in finished:
            self.running.remove(req)
            self._release(req)
            self.finished_total += 1
        return StepOutcome(start, end, prefill_tokens, self.pool.drain_events(), advanced, finished)

    def drain_events(self) -> list[VllmEvent]:
        """Events made outside a step (none today; reset_prefix_cache waits for a step)."""
        return self.pool.drain_events()

    # -- internals -----------------------------------------------------------------------------
    def _admit(self, now: float, budget: int | None = None) -> list[SimRequest]:
        """Admit waiting requests in order while they fit (sequences, KV blocks) and, with a
        `budget` of prefill tokens for this step, while some of it is left."""
        cfg = self.config
        admitted = []
        while self.waiting and len(self.running) < cfg.max_num_seqs:
            if budget is not None and budget <= 0:
                break
            req = self.waiting[0]
            if req.arrival > now:
                break
            if req._prompt_digests is None:
                req._prompt_digests = self.pool.chain_digests(req.prompt, req.lora_name)
            digests = req._prompt_digests
            # A fully cached prompt still computes its last token: reuse <= prompt_len - 1.
            max_hit_blocks = (len(req.prompt) - 1) // cfg.block_size
            hits = min(self.pool.cached_prefix(digests), max_hit_blocks)
            total_blocks = -(-req.total_tokens() // cfg.block_size)
            need = total_blocks - hits
            available = self.pool.num_free - self.pool.free_among(digests[:hits]) - self._reserved
            if need > available:
                break
            self.waiting.popleft()
            req._block_ids = self.pool.touch(digests[:hits])
            req._digests = digests[:hits]
            req._num_cached_blocks = hits
            req.cached_tokens = hits * cfg.block_size
            req._reserved = need
            self._reserved += need
            self.prefix_queries_tokens += len(req.prompt)
            self.prefix_hit_tokens += req.cached_tokens
            self.prompt_tokens_total += len(req.prompt)
            self.running.append(req)
            admitted.append(req)
            if budget is not None:
                budget -= len(req.prompt) - req.cached_tokens
        return admitted

    def _cache_full_blocks(self, req: SimRequest) -> None:
        bs = self.config.block_size
        full = req._num_computed // bs
        start = req._num_cached_blocks
        if full <= start:
            return
        tokens = [req.token_at(p) for p in range(start * bs, full * bs)]
        parent = req._digests[start - 1] if start > 0 else None
        new = self.pool.chain_digests(
            tokens, req.lora_name, parent=parent if parent is not None else NONE_DIGEST
        )
        req._digests.extend(new)
        self.pool.cache(
            req._block_ids[start:full],
            new,
            parent,
            tokens,
            lora_name=req.lora_name,
            lora_id=req.lora_id,
        )
        req._num_cached_blocks = full

    def _release(self, req: SimRequest) -> None:
        self._reserved -= req._reserved
        req._reserved = 0
        # Last block first: the tail of a sequence is evicted before its head.
        self.pool.free(list(reversed(req._block_ids)))
        req._block_ids = []

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def restart(self) -> list[SimRequest]:
        """A new engine process: empty pool, no requests, no pending events. Returns the
        requests that were in flight (now lost)."""
        lost = [*self.running, *self.waiting]
        for req in lost:
            req.aborted = True
        self.running.clear()
        self.waiting.clear()
        self._reserved = 0
        cfg = self.config
        self.pool = BlockPool(cfg.num_gpu_blocks, cfg.block_size, bytes_hashes=cfg.bytes_hashes)
        return lost
