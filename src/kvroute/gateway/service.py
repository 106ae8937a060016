"""The gateway's parts wired together (fleet, index, subscribers, tokenizer, policy) and the
routing step every request goes through: resolve model, tokenize, match, choose."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from kvroute.errors import KvrouteError, TokenizeError
from kvroute.events.subscriber import SourceSpec, SubscriberManager
from kvroute.fleet import EngineSpec, EngineState, Fleet, load_fleet_file
from kvroute.gateway.openai_body import RequestKind, RoutingRequest
from kvroute.gateway.openai_errors import GatewayHTTPError
from kvroute.index.prefix_index import IndexLimits, PrefixIndex
from kvroute.index.types import MatchResult, SourceId
from kvroute.metrics import Metrics
from kvroute.routing import Candidate, CostWeights, Decision, Policy, make_policy
from kvroute.settings import Settings
from kvroute.tokenize import CachingTokenizer, LocalTokenizer, RemoteTokenizer, Tokenizer
from kvroute.tokenize.timing import observe_since

__all__ = ["Gateway", "RouteOutcome"]

log = logging.getLogger("kvroute.gateway")


def no_healthy_engine(model: str, detail: str = "") -> GatewayHTTPError:
    """The 503 for a model whose engines are all ejected (or gone)."""
    return GatewayHTTPError(
        503,
        f"no healthy engine serves {model!r}{detail}",
        type="service_unavailable_error",
        code="no_healthy_engine",
    )


@dataclass(frozen=True)
class RouteOutcome:
    """One routing step: the base model and adapter, the prompt's ids (None when tokenization
    failed or was skipped), what each engine holds, and the policy's decision."""

    model: str
    lora: str | None
    token_ids: list[int] | None
    prompt_tokens: int
    matches: dict[str, MatchResult]
    decision: Decision

    def route_json(self) -> dict[str, object]:
        """The `/v1/route` answer (ARCHITECTURE.md "Contracts")."""
        return {
            "engine": self.decision.engine,
            "policy": self.decision.policy,
            "prompt_tokens": self.prompt_tokens,
            "engines": [
                {
                    "name": s.name,
                    "blocks_matched": s.blocks_matched,
                    "tokens_matched": s.tokens_matched,
                    "by_medium": dict(s.by_medium),
                    "speculative_blocks": s.speculative_blocks,
                    "outstanding_tokens": s.outstanding_tokens,
                    "cost": s.cost,
                    "healthy": s.healthy,
                    "stale": s.stale,
                }
                for s in self.decision.scores
            ],
        }


class Gateway:
    """Everything one gateway process holds; built by the app's lifespan, closed with it."""

    def __init__(
        self,
        settings: Settings,
        client: httpx.AsyncClient,
        metrics: Metrics,
        specs: Sequence[EngineSpec],
        *,
        fleet_file: Path | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.metrics = metrics
        self.fleet = Fleet(
            list(specs),
            client,
            metrics,
            health_interval_s=settings.health_interval_s,
            unhealthy_after=settings.unhealthy_after,
            scrape_interval_s=settings.scrape_interval_s,
            fleet_file=fleet_file,
            watch_interval_s=settings.watch_interval_s,
        )
        self.index: PrefixIndex | None = None
        self.subscribers: SubscriberManager | None = None
        policy_name = settings.policy
        if settings.kv_event_sync_enabled:
            self.index = PrefixIndex(
                IndexLimits(
                    max_blocks_per_source=settings.max_blocks_per_source,
                    max_blocks_total=settings.max_blocks_total,
                    indexed_group=settings.indexed_group,
                    speculative_ttl_s=settings.speculative_ttl_s,
                ),
                counters=metrics.event_counters,
            )
            self.subscribers = SubscriberManager(
                self.index,
                metrics,
                replay_timeout_s=settings.replay_timeout_s,
                max_concurrent_replays=settings.max_concurrent_replays,
                retry_backoff_s=(settings.retry_backoff_min_s, settings.retry_backoff_max_s),
            )
        elif policy_name == "kv_aware":
            log.warning(
                "KV event sync disabled: no subscribers, kv_aware routes as least_loaded",
                extra={"policy": "least_loaded"},
            )
            policy_name = "least_loaded"
        self.policy: Policy = make_policy(
            policy_name,
            seed=settings.seed,
            weights=CostWeights(
                w_prefill=settings.w_prefill,
                w_load=settings.w_load,
                medium={"GPU": settings.medium_weight_gpu, "CPU": settings.medium_weight_cpu},
                other_medium=settings.medium_weight_other,
                imbalance_tokens=settings.imbalance_tokens,
            ),
        )
        self.tokenizer: Tokenizer = self._build_tokenizer()
        self.fleet.on_change(self._on_fleet_change)
        self._sources: dict[str, list[SourceSpec]] = {}

    @classmethod
    def from_settings(
        cls, settings: Settings, client: httpx.AsyncClient, metrics: Metrics
    ) -> Gateway:
        specs = load_fleet_file(settings.fleet_file) if settings.fleet_file is not None else []
        return cls(settings, client, metrics, specs, fleet_file=settings.fleet_file)

    def _build_tokenizer(self) -> Tokenizer:
        s = self.settings
        inner: Tokenizer
        if s.local_tokenizer and s.tokenizer_path is not None:
            template = s.chat_template_path.read_text() if s.chat_template_path else None
            inner = LocalTokenizer(s.tokenizer_path, template)
        else:
            inner = RemoteTokenizer(
                self.client, self._tokenize_url, timeout_s=s.tokenizer_timeout_s
            )
        if s.tokenizer_cache_size > 0:
            return CachingTokenizer(inner, max_entries=s.tokenizer_cache_size)
        return inner

    def _tokenize_url(self, model: str) -> str | None:
        """A healthy engine serving `model` (a base model or an adapter) for `/tokenize`."""
        try:
            _, engines = self.fleet.engines_for_model(model)
        except KvrouteError:
            return None
        healthy = [e for e in engines if e.healthy]
        if not healthy:
            return None
        # The least busy one, so tokenization does not queue behind a hot engine.
        return min(healthy, key=lambda e: e.in_flight_requests).spec.url

    # --- lifecycle

    async def start(self) -> None:
        for spec in self.fleet_specs():
            await self._add_engine(spec)
        await self.fleet.start()
        log.info(
            "gateway started",
            extra={
                "engines": len(self.fleet.engines()),
                "policy": self.policy.name,
                "kv_event_sync": self.index is not None,
            },
        )

    async def close(self) -> None:
        if self.subscribers is not None:
            await self.subscribers.close()
        await self.fleet.close()

    def fleet_specs(self) -> list[EngineSpec]:
        return [state.spec for state in self.fleet.engines()]

    async def _add_engine(self, spec: EngineSpec) -> None:
        if self.index is None or self.subscribers is None or spec.events is None:
            return
        sources = spec.sources()
        self._sources[spec.name] = sources
        for src in sources:
            self.index.add_source(src.source, engine=spec.name, model=spec.model)
            await self.subscribers.add_source(src)

    async def _remove_engine(self, spec: EngineSpec) -> None:
        if self.index is None or self.subscribers is None:
            return
        for src in self._sources.pop(spec.name, spec.sources() if spec.events else []):
            await self.subscribers.remove_source(src.source)
            self.index.remove_source(src.source)

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
        try:
            base, engines = self.fleet.engines_for_model(model)
        except KvrouteError:
            base, engines = model, []
        if not engines:
            raise GatewayHTTPError(
                404,
                f"model: expected one of the fleet's models, got {model!r}",
                param="model",
                code="model_not_found",
            )
        return base, (model if model != base else None), engines

    def stale_engines(self) -> set[str]:
        """Engines with at least one stale source (their blocks do not count for routing)."""
        if self.subscribers is None:
            return set()
        return {s.engine for s in self.subscribers.status() if s.stale}

    async def tokenize(self, req: RoutingRequest) -> list[int] | None:
        """The prompt's ids, or None when tokenization fails (counted; routed by load)."""
        started = time.perf_counter()
        mode = "local" if self.settings.local_tokenizer else "remote"
        try:
            if req.kind is RequestKind.COMPLETION:
                assert req.prompt is not None
                ids = await self.tokenizer.tokenize_prompt(req.model, req.prompt)
            else:
                assert req.messages is not None
                ids = await self.tokenizer.tokenize_chat(
                    req.model,
                    req.messages,
                    add_generation_prompt=req.add_generation_prompt,
                    chat_template_kwargs=req.chat_template_kwargs,
                )
        except TokenizeError as exc:
            self.metrics.tokenize_failures.inc()
            log.debug("tokenization failed; routing by load", extra={"error": str(exc)})
            return None
        observe_since(self.metrics, mode, started)
        return ids

    async def route(self, req: RoutingRequest) -> RouteOutcome:
        """Resolve, tokenize, match and choose; 404 unknown model, 503 no healthy engine."""
        base, lora, engines = self.resolve_model(req.model)
        if not any(e.healthy for e in engines):
            raise no_healthy_engine(req.model, f" ({len(engines)} known, 0 healthy)")
        token_ids: list[int] | None = None
        if self.index is not None:
            token_ids = await self.tokenize(req)
        prompt_tokens = len(token_ids) if token_ids is not None else req.estimated_prompt_tokens()
        started = time.perf_counter()
        matches: dict[str, MatchResult] = {}
        if self.index is not None and token_ids:
            matches = self.index.match(base, lora, token_ids, cache_salt=req.cache_salt)
        # Re-read engines: tokenization awaited, health or load may have moved meanwhile.
        candidates = [self._candidate(e) for e in engines]
        if not any(c.healthy for c in candidates):
            raise no_healthy_engine(req.model)
        decision = self.policy.choose(candidates, matches, prompt_tokens)
        self.metrics.route_decision_seconds.observe(time.perf_counter() - started)
        stale = self.stale_engines()
        if stale:
            decision = replace(
                decision,
                scores=[replace(s, stale=s.name in stale) for s in decision.scores],
            )
        return RouteOutcome(base, lora, token_ids, prompt_tokens, matches, decision)

    def _candidate(self, engine: EngineState) -> Candidate:
        current = self.fleet.get(engine.spec.name) or engine
        return Candidate(
            name=current.spec.name,
            healthy=current.healthy,
            outstanding_tokens=current.outstanding_tokens,
            in_flight=current.in_flight_requests,
        )

    def add_speculative(self, engine: str, outcome: RouteOutcome, cache_salt: str | None) -> None:
        """Claim the routed prompt's blocks for `engine` until its events confirm them."""
        if self.index is not None and outcome.token_ids:
            self.index.add_speculative(
                engine, outcome.model, outcome.lora, outcome.token_ids, cache_salt=cache_salt
            )

    def source_ids(self, engine: str) -> list[SourceId]:
        return [s.source for s in self._sources.get(engine, [])]
