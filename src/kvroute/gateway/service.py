"""The running gateway's parts, passed in by the app's lifespan (gateway/app.py), and the routing
step every request goes through: resolve model, tokenize, match, choose."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Final

from kvroute.core import EngineClient, MatchResult, SourceId
from kvroute.errors import GatewayHTTPError, TokenizeError
from kvroute.events import SubscriberManager
from kvroute.fleet import (
    KV_CACHE_USAGE,
    KV_POOL_BLOCKS,
    EngineSpec,
    EngineState,
    Fleet,
    SpeculativeClaim,
)
from kvroute.gateway.openai_body import (
    DEFAULT_MAX_JSON_DEPTH,
    RequestKind,
    RoutingRequest,
    check_prompt_length,
    parse_passthrough,
    parse_request,
)
from kvroute.gateway.openai_errors import no_healthy_engine
from kvroute.gateway.outcome import RouteOutcome
from kvroute.gateway.prompt_worker import PreparedRequest, PromptWorkers
from kvroute.gateway.proxy import HeaderRules
from kvroute.gateway.silence import SilentSources
from kvroute.index import PrefixIndex
from kvroute.metrics import Metrics
from kvroute.persist.index_snapshot import RestoredSource
from kvroute.persist.writer import SnapshotWriter
from kvroute.routing import (
    Candidate,
    CostWeights,
    EvictionRecency,
    Policy,
    needs_tokens,
    uncached_prefill,
)
from kvroute.routing.backlog import PrefillBacklog
from kvroute.tokenize import Tokenizer

if TYPE_CHECKING:  # the `shared` extra (redis) is imported only when a store is configured
    from kvroute.fleet.shared_state import SharedState

__all__ = ["Gateway"]

log = logging.getLogger("kvroute.gateway")

# Blocks offloaded to CPU or disk are loaded, not recomputed: every matched token is one the
# engine does not prefill, whatever kv_aware's medium weights say of its value.
_EVERY_MEDIUM_SAVES: Final = CostWeights(medium={"GPU": 1.0, "CPU": 1.0}, other_medium=1.0)


@dataclass(kw_only=True, eq=False)
class Gateway:
    """Everything one gateway process holds, built elsewhere and passed in; `index` and
    `subscribers` are None when KV event sync is off. `start()` subscribes to the fleet's event
    sources and starts the fleet's loops; fleet changes add and remove sources; `close()` stops
    both. It is the proxy's `ProxyContext` (gateway/proxy.py)."""

    fleet: Fleet
    client: EngineClient
    metrics: Metrics
    policy: Policy
    tokenizer: Tokenizer
    index: PrefixIndex | None
    subscribers: SubscriberManager | None
    ready_bootstrap_deadline_s: float
    max_body_bytes: int = 32 * 1024 * 1024  # settings.max_request_body_bytes
    max_prompt_tokens: int = 0  # 0: no limit (settings.max_prompt_tokens)
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH  # settings.max_json_depth
    body_timeout_s: float | None = None  # settings.body_timeout_s (None: no deadline)
    # Bodies of at least `prompt_offload_bytes` are parsed (and tokenized, with a local
    # tokenizer) by `prompt_workers`, off the loop; None: every body on the loop.
    prompt_workers: PromptWorkers | None = None
    prompt_offload_bytes: int = 64 * 1024
    access_log: bool = True  # settings.access_log: a `kvroute.access` line per proxied request
    header_rules: HeaderRules = field(default_factory=HeaderRules)  # client headers upstream
    shared: SharedState | None = None  # the store replicas share load through (optional)
    # Warm restarts (persist/): the writer, and the sources a snapshot loaded at start holds,
    # handed to their sources once as they are added (only to the same identity).
    snapshots: SnapshotWriter | None = None
    restores: dict[SourceId, RestoredSource] = field(default_factory=dict)
    # Sources silent while their engine serves requests (gateway/silence.py); None: not watched.
    silence: SilentSources | None = None
    # Prompt tokens sent to each engine and predicted still waiting for prefill (kv_aware).
    prefill: PrefillBacklog = field(default_factory=PrefillBacklog)
    # Engines whose pools evicted lately, from their BlockRemoved events (kv_aware's queue weight).
    evictions: EvictionRecency = field(default_factory=EvictionRecency)
    _snapshot_task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _silence_task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.fleet.on_change(self._on_fleet_change)

    # --- lifecycle

    async def start(self) -> None:
        for spec in self.fleet.specs():
            await self._add_engine(spec)
        await self.fleet.start()
        if self.shared is not None:
            await self.shared.start()
        if self.snapshots is not None:
            self._snapshot_task = asyncio.create_task(self.snapshots.run(), name="kvroute-snapshot")
        if self.silence is not None:
            self._silence_task = asyncio.create_task(self.silence.run(), name="kvroute-silence")
        log.info(
            "gateway started",
            extra={
                "engines": len(self.fleet.engines()),
                "policy": self.policy.name,
                "kv_event_sync": self.index is not None,
                "load_source": self.fleet.load_source.value,
                "shared_state": self.shared is not None,
            },
        )

    async def close(self) -> None:
        for task in (self._snapshot_task, self._silence_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.snapshots is not None and self.subscribers is not None:
            self.snapshots.write_now()  # graceful shutdown: the freshest state, in-process
        if self.shared is not None:
            await self.shared.close()
        if self.subscribers is not None:
            await self.subscribers.close()
        if self.prompt_workers is not None:
            await self.prompt_workers.close()
        await self.fleet.close()

    async def _add_engine(self, spec: EngineSpec) -> None:
        # SubscriberManager registers each source with the index too (events/subscriber.py).
        if self.subscribers is not None:
            for source in spec.sources():
                restored = self.restores.pop(source.source, None)
                restore = None
                if restored is not None and restored.matches(source):
                    restore = (restored.last, restored.digest, restored.export)
                await self.subscribers.add_source(source, restore)

    async def _remove_engine(self, spec: EngineSpec) -> None:
        if self.subscribers is not None:
            for source in spec.sources():
                await self.subscribers.remove_source(source.source)

    async def _on_fleet_change(self, added: list[EngineSpec], removed: list[EngineSpec]) -> None:
        for spec in removed:
            await self._remove_engine(spec)
        for spec in added:
            await self._add_engine(spec)
        log.info(
            "fleet changed",
            extra={"added": [s.name for s in added], "removed": [s.name for s in removed]},
        )

    # --- routing

    def resolve_model(self, model: str) -> tuple[str, str | None, list[EngineState]]:
        """(base model, adapter or None, engines serving it); 404 for a model nobody serves."""
        base, engines = self.fleet.engines_for_model(model)
        if not engines:
            raise GatewayHTTPError(
                404,
                f"model: expected one of the fleet's models, got {model!r}",
                param="model",
                code="model_not_found",
            )
        return base, (model if model != base else None), engines

    async def tokenize(self, req: RoutingRequest) -> list[int] | None:
        """The prompt's ids, or None when tokenization fails (counted; routed by load). The
        tokenizers time themselves (`Metrics.observe_tokenize`, wired in gateway/app.py)."""
        try:
            if req.kind is RequestKind.COMPLETION:
                assert req.prompt is not None
                return await self.tokenizer.tokenize_prompt(req.model, req.prompt)
            assert req.messages is not None
            return await self.tokenizer.tokenize_chat(
                req.model,
                req.messages,
                add_generation_prompt=req.add_generation_prompt,
                chat_template_kwargs=req.chat_template_kwargs,
            )
        except TokenizeError as exc:
            self.metrics.tokenize_failures.inc()
            log.debug("tokenization failed; routing by load", extra={"error": str(exc)})
            return None

    async def prepare(self, kind: RequestKind | None, raw: bytes) -> PreparedRequest:
        """The body parsed and checked: on the loop when small, by a prompt worker (which also
        tokenizes, with a local tokenizer) from `prompt_offload_bytes` on."""
        if self.prompt_workers is not None and len(raw) >= self.prompt_offload_bytes:
            self.metrics.prompts_offloaded.inc()
            prepared = await self.prompt_workers.prepare(kind, raw)
            if prepared.tokenize_error is not None:
                self.metrics.tokenize_failures.inc()
                log.debug(
                    "tokenization failed; routing by load",
                    extra={"error": prepared.tokenize_error},
                )
            return prepared
        return PreparedRequest(
            parse_request(
                kind, raw, self.max_body_bytes, self.max_json_depth, self.max_prompt_tokens
            )
        )

    def prepare_passthrough(self, path: str, raw: bytes) -> PreparedRequest:
        """A body for another engine endpoint (openai_body.PASSTHROUGH_PATHS): parsed on the
        loop when small; from `prompt_offload_bytes` on only its model is read (by load)."""
        return PreparedRequest(
            parse_passthrough(
                path,
                raw,
                max_json_depth=self.max_json_depth,
                max_prompt_tokens=self.max_prompt_tokens,
                whole=len(raw) < self.prompt_offload_bytes,
            )
        )

    @property
    def wants_tokens(self) -> bool:
        """Whether routing reads the prompt's tokens: only with an index to match them against
        and a policy that reads matches (routing.needs_tokens; round_robin, least_loaded and
        random do not). Otherwise nothing is tokenized and the prompt's size is the request's
        estimate (openai_body.RoutingRequest.estimated_prompt_tokens) unless ids were given."""
        return self.index is not None and needs_tokens(self.policy)

    async def route(
        self, req: RoutingRequest, token_ids: Sequence[int] | None = None
    ) -> RouteOutcome:
        """Resolve, tokenize (when `wants_tokens` and no `token_ids` are given), match and
        choose; 404 unknown model, 503 no healthy engine."""
        base, lora, engines = self.resolve_model(req.model)
        if not any(e.healthy for e in engines):
            raise no_healthy_engine(req.model, f" ({len(engines)} known, 0 healthy)")
        # A prompt given as ids was held to max_prompt_tokens by parse_request (prepare).
        given = token_ids
        if not self.wants_tokens:
            token_ids = None
        elif token_ids is None and (req.prompt is not None or req.messages is not None):
            token_ids = await self.tokenize(req)  # (a passed-through body may have no prompt)
        counted = token_ids if token_ids is not None else given  # ids given, not matched
        prompt_tokens = len(counted) if counted is not None else req.estimated_prompt_tokens()
        self._check_prompt_length(prompt_tokens)
        started = time.perf_counter()
        matches: dict[str, MatchResult] = {}
        if self.index is not None and token_ids:
            matches = self.index.match(base, lora, token_ids, cache_salt=req.cache_salt)
        # Re-read engines: tokenization awaited, health or load may have moved meanwhile.
        candidates = [self._candidate(e) for e in engines]
        if self.index is not None and token_ids:
            candidates = self._with_kv_state(base, candidates)
        if not any(c.healthy for c in candidates):
            raise no_healthy_engine(req.model)
        decision = self.policy.choose(candidates, matches, prompt_tokens)
        self.metrics.route_decision_seconds.labels(self.policy.name).observe(
            time.perf_counter() - started
        )
        if self.index is not None and (stale := self.index.stale_engines()):
            decision = replace(
                decision,
                scores=[replace(s, stale=s.name in stale) for s in decision.scores],
            )
        return RouteOutcome(base, lora, token_ids, prompt_tokens, matches, decision)

    def _check_prompt_length(self, tokens: int) -> None:
        check_prompt_length(tokens, self.max_prompt_tokens)

    def _candidate(self, engine: EngineState) -> Candidate:
        current = self.fleet.get(engine.spec.name) or engine
        name = current.spec.name
        load = self.fleet.load(current)  # memory only: scrapes and the store update it
        if load.requests == 0:  # an engine with nothing in flight has no prefill queued
            self.prefill.clear(name)
        return Candidate(
            name=name,
            healthy=current.healthy,
            outstanding_tokens=load.tokens,
            in_flight=load.requests,
            queued_prefill_tokens=self.prefill.pending(name),
            kv_usage=self.fleet.fresh_gauge(current, KV_CACHE_USAGE),
        )

    def _with_kv_state(self, model: str, candidates: list[Candidate]) -> list[Candidate]:
        """`candidates` with what their KV pools say: `evicting` (BlockRemoved lately), and
        `free_kv_tokens` where the engine reported its pool size (pool blocks less the blocks
        the index holds there, in tokens of the model's block size)."""
        index = self.index
        assert index is not None
        now = time.monotonic()
        self.evictions.update(index.engine_removed_counts(), now)
        sizes = index.block_sizes(model)
        block_size = max(sizes) if sizes else 0  # 0: no block yet, so no pool in tokens
        held: dict[str, int] | None = None  # the index's blocks per engine, read once if needed
        out = []
        for c in candidates:
            evicting = self.evictions.evicting(c.name, now)
            state = self.fleet.get(c.name) if block_size else None
            pool = self.fleet.fresh_gauge(state, KV_POOL_BLOCKS) if state is not None else None
            free = None
            if pool is not None:
                held = index.engine_block_counts() if held is None else held
                free = max(0.0, pool - held.get(c.name, 0)) * block_size
            if evicting or free is not None:
                c = replace(c, evicting=evicting, free_kv_tokens=free)
            out.append(c)
        return out

    # --- what the proxy asks (ProxyContext)

    def engine_url(self, engine: str) -> str | None:
        state = self.fleet.get(engine)
        return state.spec.url if state is not None else None

    def next_engine(self, ranked: Sequence[str], tried: AbstractSet[str]) -> str | None:
        for name in ranked:
            state = self.fleet.get(name)
            if name not in tried and state is not None and state.healthy:
                return name
        return None

    def least_loaded_engine(self) -> str | None:
        """The healthy engine with the fewest outstanding tokens (for requests with no prompt)."""
        loads = [(self.fleet.load(e), e.name) for e in self.fleet.engines() if e.healthy]
        if not loads:
            return None
        return min(loads, key=lambda le: (le[0].tokens, le[0].requests, le[1]))[1]

    def begin_request(self, engine: str, tokens: int) -> None:
        self.fleet.begin_request(engine, tokens)

    def end_request(self, engine: str, tokens: int) -> None:
        self.fleet.end_request(engine, tokens)

    def note_served(self, engine: str) -> None:
        self.fleet.note_served(engine)

    def mark_failure(self, engine: str) -> None:
        self.fleet.mark_failure(engine)

    def add_speculative(self, engine: str, outcome: RouteOutcome, cache_salt: str | None) -> None:
        """The prompt is being sent to `engine` (proxy.py, picker.py): its blocks become
        speculative entries there and its uncached part joins the engine's prefill queue."""
        uncached = uncached_prefill(
            outcome.matches.get(engine), outcome.prompt_tokens, _EVERY_MEDIUM_SAVES
        )
        self.prefill.add(engine, uncached)
        if self.index is not None and outcome.token_ids:
            self.index.add_speculative(
                engine, outcome.model, outcome.lora, outcome.token_ids, cache_salt=cache_salt
            )
            if self.shared is not None:  # queued for the other replicas; no I/O here
                head = self.index.speculative_head(outcome.model, outcome.lora, outcome.token_ids)
                self.shared.claim(
                    SpeculativeClaim(
                        engine,
                        outcome.model,
                        outcome.lora,
                        head if isinstance(head, list) else list(head),
                        cache_salt,
                    )
                )

    def add_shared_speculative(self, claim: SpeculativeClaim) -> bool:
        """Another replica's claim (fleet/shared_state.py): into this index as if routed here;
        False when this replica does not know the engine or keeps no index."""
        if self.index is None or self.fleet.get(claim.engine) is None or not claim.token_ids:
            return False
        self.index.add_speculative(
            claim.engine, claim.model, claim.lora, claim.token_ids, cache_salt=claim.cache_salt
        )
        return True
