"""`create_app(settings)`: the gateway's Starlette app; its lifespan builds every part once from
the settings (engine client, fleet, index, subscribers, tokenizer, policy) and closes them."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvroute.core import EngineClient, EventCounters, PolicyName
from kvroute.errors import ConfigError, GatewayHTTPError
from kvroute.events import CurveKeyPair, SubscriberManager, load_curve_key_pair
from kvroute.fleet import EngineSpec, Fleet, FleetSource, load_fleet_file
from kvroute.gateway import handlers
from kvroute.gateway.auth import Handler, load_token, require_bearer
from kvroute.gateway.openai_body import PASSTHROUGH_PATHS
from kvroute.gateway.openai_errors import http_error_response
from kvroute.gateway.openapi import openapi_document
from kvroute.gateway.prompt_worker import PromptLimits, PromptWorkers
from kvroute.gateway.proxy import HeaderRules
from kvroute.gateway.service import Gateway
from kvroute.gateway.silence import SilentSources
from kvroute.index import IndexLimits, PrefixIndex, create_index
from kvroute.metrics import Metrics
from kvroute.persist import RefuseReason, SnapshotRefused, remove_stale_temp_files
from kvroute.persist.index_snapshot import load_sources
from kvroute.persist.writer import SnapshotWriter
from kvroute.routing import CostWeights, make_policy
from kvroute.routing.backlog import PrefillBacklog
from kvroute.routing.eviction import EvictionRecency
from kvroute.settings import Settings
from kvroute.tokenize import CachingTokenizer, LocalTokenizer, RemoteTokenizer, Tokenizer
from kvroute.upstream import HttpxEngineClient

if TYPE_CHECKING:
    from kvroute.fleet.shared_state import SharedState
    from kvroute.gateway.picker import PickerServer

__all__ = ["IndexFactory", "build_gateway", "create_app", "curve_keys"]

log = logging.getLogger("kvroute.gateway")

IndexFactory = Callable[[IndexLimits, EventCounters], PrefixIndex]
"""Builds the gateway's index from its limits and counters instead of `create_index` (the
settings' `index_impl`); only `kvroute bench trace` passes one, for its oracle."""


def build_gateway(
    settings: Settings,
    client: EngineClient,
    metrics: Metrics,
    header_rules: HeaderRules | None = None,
    index_factory: IndexFactory | None = None,
) -> Gateway:
    """The gateway's parts, each built once from `settings` and passed in explicitly; the state
    they keep (fleet health and reloads, index blocks, sources) is attached to `metrics`, which
    reads it at scrape time. Reads the fleet file (and, without `header_rules`, the engine key
    file); not started yet. `index_factory` replaces `create_index` (a benchmark's oracle)."""
    specs = load_fleet_file(settings.fleet_file) if settings.fleet_file is not None else []
    gateway_pair = curve_keys(settings, specs)
    fleet = Fleet(
        specs,
        client,
        health_interval_s=settings.health_interval_s,
        unhealthy_after=settings.unhealthy_after,
        scrape_interval_s=settings.scrape_interval_s,
        watch_interval_s=settings.watch_interval_s,
        fleet_file=settings.fleet_file,
        source=_kubernetes_source(settings, metrics),
        load_source=settings.load_source,
    )
    metrics.watch_fleet(lambda: [(e.name, e.healthy) for e in fleet.engines()], fleet.reloads)
    metrics.watch_load(lambda: [(e.name, *fleet.load(e).pair()) for e in fleet.engines()])
    metrics.watch_engines(
        lambda: [(e.name, e.in_flight_requests, e.scraped) for e in fleet.engines()]
    )
    index: PrefixIndex | None = None
    subscribers: SubscriberManager | None = None
    policy_name = settings.policy
    if settings.kv_event_sync_enabled:
        limits = IndexLimits(
            max_index_bytes=settings.max_index_bytes,
            max_blocks_per_source=settings.max_blocks_per_source,
            max_blocks_total=settings.max_blocks_total,
            indexed_group=settings.indexed_group,
            speculative_ttl_s=settings.speculative_ttl_s,
        )
        if index_factory is not None:
            index = index_factory(limits, metrics.event_counters)
        else:
            index = create_index(limits, counters=metrics.event_counters, impl=settings.index_impl)
        subscribers = SubscriberManager(
            index,
            metrics.event_counters,
            replay_timeout_s=settings.replay_timeout_s,
            max_concurrent_replays=settings.max_concurrent_replays,
            retry_backoff_s=(settings.retry_backoff_min_s, settings.retry_backoff_max_s),
            tail_check_s=settings.tail_check_s,
            ingest_limits=settings.ingest_limits,
            max_message_bytes=settings.max_event_message_bytes,
            max_replay=(settings.max_replay_batches, settings.max_replay_bytes),
            curve_keys=gateway_pair,
            receive_impl=settings.receive_impl,
            coalesce_s=settings.ingest_coalesce_ms / 1000,
        )
        metrics.watch_index(index.blocks_by_model, index.memory, index.impl)
        metrics.watch_sources(subscribers.status)
    elif policy_name is PolicyName.KV_AWARE:
        log.warning(
            "KV event sync disabled: no subscribers, kv_aware routes as least_loaded",
            extra={"policy": PolicyName.LEAST_LOADED.value},
        )
        policy_name = PolicyName.LEAST_LOADED
    policy = make_policy(
        policy_name,
        seed=settings.seed,
        weights=CostWeights(
            w_prefill=settings.w_prefill,
            w_load=settings.w_load,
            medium={"GPU": settings.medium_weight_gpu, "CPU": settings.medium_weight_cpu},
            other_medium=settings.medium_weight_other,
            imbalance_tokens=settings.imbalance_tokens,
            w_queue=settings.w_queue,
            w_evict=settings.w_evict,
            w_queue_evicting=settings.w_queue_evicting,
            saturated_queue_ratio=settings.saturated_queue_ratio,
        ),
    )
    gateway = Gateway(
        fleet=fleet,
        client=client,
        metrics=metrics,
        policy=policy,
        tokenizer=_tokenizer(settings, client, fleet, metrics),
        index=index,
        subscribers=subscribers,
        ready_bootstrap_deadline_s=settings.ready_bootstrap_deadline_s,
        max_body_bytes=settings.max_request_body_bytes,
        max_prompt_tokens=settings.max_prompt_tokens,
        max_json_depth=settings.max_json_depth,
        body_timeout_s=settings.body_timeout_s,
        prompt_offload_bytes=settings.prompt_offload_bytes,
        access_log=settings.access_log,
        header_rules=header_rules if header_rules is not None else _header_rules(settings),
        prefill=PrefillBacklog(settings.prefill_tok_per_s),
        evictions=EvictionRecency(settings.evicting_window_s),
    )
    gateway.prompt_workers = _prompt_workers(settings, tokens=gateway.wants_tokens)
    gateway.shared = _shared_state(settings, gateway, metrics)
    if subscribers is not None and settings.silent_source_s > 0:
        gateway.silence = SilentSources(
            settings.silent_source_s, subscribers.status, fleet.served_requests
        )
        metrics.watch_silence(gateway.silence.silent)
    if settings.snapshot_path is not None and subscribers is not None:
        _warm_restart(settings.snapshot_path, settings, gateway, subscribers, metrics)
    return gateway


async def _openapi(_request: Request) -> Response:
    return JSONResponse(openapi_document())


def curve_keys(settings: Settings, specs: list[EngineSpec]) -> CurveKeyPair | None:
    """The gateway's CURVE key pair from its files; a ConfigError when the fleet names a server
    key but no pair is set, or a file does not hold a valid pair."""
    secret, public = settings.curve_secret_key_file, settings.curve_public_key_file
    if secret is None or public is None:
        keyed = [s.name for s in specs if s.curve_server_key is not None]
        if keyed:
            raise ConfigError(
                f"fleet: engine(s) {keyed} have a curve_server_key, but the gateway has no "
                "CURVE key pair: set curve_secret_key_file and curve_public_key_file"
            )
        return None
    return load_curve_key_pair(secret, public, what="curve_secret_key_file")


def _header_rules(settings: Settings) -> HeaderRules:
    key = None
    if settings.engine_api_key_file is not None:
        raw = load_token(settings.engine_api_key_file, "engine_api_key_file")
        try:
            key = "Bearer " + raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise ConfigError("engine_api_key_file: expected an ASCII key") from exc
    strip = frozenset(
        name.strip().lower() for name in settings.strip_client_headers.split(",") if name.strip()
    )
    return HeaderRules(strip=strip, authorization=key)


def _warm_restart(
    path: Path,
    settings: Settings,
    gateway: Gateway,
    subscribers: SubscriberManager,
    metrics: Metrics,
) -> None:
    """Load the snapshot at `path` (before any source is added: each takes its part as it is,
    unconfirmed) and set up its writer. A refused snapshot is one log line and a counter, and
    the gateway starts cold (docs/design.md §14)."""
    refused: dict[str, int] = {}
    for temp in remove_stale_temp_files(path):
        log.info("removed a snapshot temp file a killed writer left", extra={"path": str(temp)})
    started = time.perf_counter()
    try:
        restored = load_sources(path, fleet=settings.fleet_name)
    except SnapshotRefused as exc:
        if exc.reason is RefuseReason.MISSING:
            log.info("no snapshot at %s: starting cold", path)
        else:
            refused[exc.reason.value] = 1
            log.warning("%s", exc, extra={"reason": exc.reason.value})
        restored = []
    gateway.restores = {r.source: r for r in restored}
    if restored:
        log.info(
            "snapshot loaded: its sources stay unconfirmed until their engines confirm them",
            extra={
                "path": str(path),
                "sources": len(restored),
                "blocks": sum(r.export.blocks for r in restored),
                "seconds": round(time.perf_counter() - started, 3),
            },
        )
    writer = SnapshotWriter(
        path,
        fleet=settings.fleet_name,
        collect=subscribers.snapshot_sources,
        interval_s=settings.snapshot_interval_s,
    )
    gateway.snapshots = writer
    metrics.watch_snapshots(
        lambda: {
            "written": writer.stats.written,
            "failed": writer.stats.failed,
            "last_bytes": writer.stats.last_bytes,
            "last_write_s": writer.stats.last_write_s,
            "last_pause_s": writer.stats.last_pause_s,
            "max_pause_s": writer.stats.max_pause_s,
        },
        refused,
        lambda: len(subscribers.unconfirmed()),
    )


def _shared_state(settings: Settings, gateway: Gateway, metrics: Metrics) -> SharedState | None:
    """The shared store of several replicas when `shared_state_url` is set (the `shared`
    extra); it only moves counts and claims between this replica's fleet and index and the
    store, in the background."""
    if settings.shared_state_url is None:
        return None
    try:
        from kvroute.fleet.shared_state import SharedState
    except ImportError as exc:
        raise ConfigError(
            "shared_state_url: sharing state between replicas needs the shared extra: "
            f"pip install 'kvroute[shared]' ({exc})"
        ) from exc
    fleet = gateway.fleet
    shared = SharedState(
        settings.shared_state_url,
        loads=fleet.local_loads,
        on_loads=fleet.set_shared_load,
        on_claim=gateway.add_shared_speculative,
        interval_s=settings.shared_state_interval_s,
        ttl_s=settings.shared_state_ttl_s,
        key_prefix=settings.shared_state_key_prefix,
        backoff_s=(settings.retry_backoff_min_s, settings.retry_backoff_max_s),
    )
    fleet.on_local_load(shared.loads_changed)
    metrics.watch_shared_state(
        shared.errors,
        shared.dropped,
        shared.claims,
        shared.load_updates,
        lambda: (shared.up, shared.peers),
    )
    return shared


def _kubernetes_source(settings: Settings, metrics: Metrics) -> FleetSource | None:
    """Kubernetes pod discovery when `k8s_namespace` is set (needs the `kubernetes` extra)."""
    if settings.k8s_namespace is None:
        return None
    try:
        from kvroute.fleet.kubernetes import (
            KubernetesFleetSource,
            KubernetesTarget,
            kubernetes_api_client,
        )
    except ImportError as exc:
        raise ConfigError(
            "k8s_namespace: Kubernetes discovery needs the kubernetes extra: "
            f"pip install 'kvroute[kubernetes]' ({exc})"
        ) from exc
    kubeconfig = settings.kubeconfig
    if kubeconfig is not None and not kubeconfig.is_file():
        raise ConfigError(f"kubeconfig: expected a kubeconfig file, got {str(kubeconfig)!r}")
    source = KubernetesFleetSource(
        KubernetesTarget(
            settings.k8s_namespace, settings.k8s_label_selector, settings.k8s_inference_pool
        ),
        lambda: kubernetes_api_client(kubeconfig),
        watch_timeout_s=settings.k8s_watch_timeout_s,
        backoff_s=(settings.retry_backoff_min_s, settings.retry_backoff_max_s),
    )
    metrics.watch_discovery(source.errors)
    return source


def _picker(settings: Settings) -> PickerServer | None:
    """The endpoint picker's gRPC server, its port bound, when `picker_port` is set (needs the
    `picker` extra)."""
    if settings.picker_port is None:
        return None
    try:
        from kvroute.gateway.picker import PickerServer
    except ImportError as exc:
        raise ConfigError(
            "picker_port: the endpoint picker needs the picker extra: "
            f"pip install 'kvroute[picker]' ({exc})"
        ) from exc
    return PickerServer(settings.host, settings.picker_port)


def _prompt_workers(settings: Settings, *, tokens: bool) -> PromptWorkers | None:
    """Workers for large bodies; they tokenize too when the gateway tokenizes locally and
    routing reads `tokens`."""
    if settings.prompt_workers == 0:
        return None
    local = tokens and settings.local_tokenizer and settings.tokenizer_path is not None
    return PromptWorkers(
        settings.prompt_workers,
        PromptLimits(
            settings.max_request_body_bytes, settings.max_json_depth, settings.max_prompt_tokens
        ),
        tokenizer_json=settings.tokenizer_path if local else None,
        piece_cache_bytes=settings.tokenizer_piece_cache_bytes,
        chat_template=settings.chat_template_path.read_text()
        if local and settings.chat_template_path
        else None,
    )


def _tokenizer(
    settings: Settings, client: EngineClient, fleet: Fleet, metrics: Metrics
) -> Tokenizer:
    """A local tokenizer when one is configured (and remote is not forced), else an engine's
    `/tokenize` on the fleet's least busy healthy engine; behind an LRU unless its size is 0."""
    observe = metrics.observe_tokenize
    inner: Tokenizer
    if settings.local_tokenizer and settings.tokenizer_path is not None:
        template = settings.chat_template_path.read_text() if settings.chat_template_path else None
        local = LocalTokenizer(
            settings.tokenizer_path,
            template,
            observe=observe,
            piece_cache_bytes=settings.tokenizer_piece_cache_bytes,
        )
        log.info("local tokenizer: %s", local.encoding_mode)
        if (pieces := local.piece_cache) is not None:
            metrics.watch_piece_cache(lambda: (pieces.hits, pieces.misses, pieces.bytes))
        inner = local
    else:
        inner = RemoteTokenizer(
            client, fleet.url_for_model, timeout_s=settings.tokenizer_timeout_s, observe=observe
        )
    if settings.tokenizer_cache_size > 0:
        cache = CachingTokenizer(
            inner,
            max_entries=settings.tokenizer_cache_size,
            max_bytes=settings.tokenizer_cache_bytes,
            observe=observe,
        )
        metrics.watch_tokenizer_cache(lambda: (cache.hits, cache.misses, len(cache)))
        return cache
    return inner


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (no such path) and 405 (wrong method), in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    response = http_error_response(
        GatewayHTTPError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
    )
    response.headers.update(exc.headers or {})
    return response


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    return http_error_response(
        GatewayHTTPError(500, f"internal error: {type(exc).__name__}", type="server_error")
    )


def create_app(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    index_factory: IndexFactory | None = None,
) -> Starlette:
    """The gateway app; `app.state.gateway` holds the running `Gateway` between start and stop.
    `index_factory`: see `build_gateway`."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with HttpxEngineClient(
            connect_timeout_s=settings.upstream_connect_timeout_s,
            read_timeout_s=settings.upstream_read_timeout_s,
            max_connections=settings.upstream_max_connections,
            keep_alive_s=settings.upstream_keep_alive_s,
        ) as client:
            picker = _picker(settings)  # its port first: a taken one fails before anything starts
            gateway: Gateway | None = None
            try:
                gateway = build_gateway(
                    settings,
                    client,
                    metrics if metrics is not None else Metrics(),
                    header_rules,
                    index_factory,
                )
                await gateway.start()
                app.state.gateway = gateway
                if picker is not None:
                    await picker.start(gateway)
                    app.state.picker_port = picker.port
                yield
            finally:
                if picker is not None:
                    await picker.stop(grace=1.0)
                if gateway is not None:
                    await gateway.close()

    # The operator endpoints: `/v1/route` tells anyone which engine holds a prompt (another
    # tenant's, say), `/debug/*` the fleet's state.
    header_rules = _header_rules(settings)  # an unreadable engine key fails here, not at start
    route: Handler = handlers.route
    debug_engines: Handler = handlers.debug_engines
    metrics_page: Handler = handlers.metrics
    if settings.admin_token_file is not None:
        token = load_token(settings.admin_token_file)
        route = require_bearer(route, token)
        debug_engines = require_bearer(debug_engines, token)
        if settings.metrics_require_token:
            metrics_page = require_bearer(metrics_page, token)
    elif settings.metrics_require_token:
        raise ConfigError("metrics_require_token: needs admin_token_file")
    routes = [
        Route("/v1/completions", handlers.completions, methods=["POST"]),
        Route("/v1/chat/completions", handlers.chat_completions, methods=["POST"]),
        Route("/v1/route", route, methods=["POST"]),
        *(Route(path, handlers.passthrough, methods=["POST"]) for path in PASSTHROUGH_PATHS),
        Route("/v1/models", handlers.list_models, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
        Route("/healthz", handlers.healthz, methods=["GET"]),
        Route("/readyz", handlers.readyz, methods=["GET"]),
        Route("/debug/engines", debug_engines, methods=["GET"]),
        Route("/openapi.json", _openapi, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            GatewayHTTPError: handlers.http_error,
            HTTPException: _http_exception,
            Exception: _internal_error,
        },
    )
