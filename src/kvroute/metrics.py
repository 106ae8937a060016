"""Every Prometheus metric kvroute exports, defined once, on an explicit registry; state kept
elsewhere (event counters, sources, index, fleet) is read by collectors at scrape time."""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from typing import Final, Protocol, TypeAlias

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvroute import __version__
from kvroute.core import EventCounters, SourceId, SourceStatus

__all__ = ["Metrics", "RelayMetrics"]

# Counters and histograms get no `_created` series: they doubled every counter on /metrics and
# no query here uses them (process-wide in prometheus_client).
disable_created_metrics()  # type: ignore[no-untyped-call]
# Seconds, from a cached-prefix completion (~10 ms) to a long generation (minutes).
_LATENCY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0
)  # fmt: skip


def _counter(
    name: str, doc: str, labels: list[str], items: Iterable[tuple[object, float]]
) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in items:
        family.add_metric(list(key) if isinstance(key, tuple) else [str(key)], value)
    return family


def _cache_series(
    stats: tuple[int, int, int], lookups: tuple[str, str], size: tuple[str, str]
) -> Iterator[Metric]:
    """A cache's lookups per result and its size gauge from `stats`: (hits, misses, size);
    `lookups` and `size` are (name, help)."""
    hits, misses, held = stats
    yield _counter(*lookups, ["result"], [("hit", hits), ("miss", misses)])
    yield GaugeMetricFamily(*size, value=float(held))


class _EventCountersCollector(Collector):
    """`EventCounters` (core/counters.py) as Prometheus counters."""

    def __init__(self, counters: EventCounters) -> None:
        self._c = counters

    def collect(self) -> Iterator[Metric]:
        c = self._c
        yield _counter(
            "kvroute_event_batches", "Event batches received, per source.", ["source"],
            list(c.batches.items()),
        )  # fmt: skip
        yield _counter(
            "kvroute_events_applied",
            "Events applied to the index, per source and event type.",
            ["source", "type"],
            list(c.applied.items()),
        )
        yield _counter(
            "kvroute_events_dropped",
            "Events or batches not applied, per source and reason.",
            ["source", "reason"],
            list(c.dropped.items()),
        )
        yield _counter(
            "kvroute_seq_gaps", "Sequence gaps detected on the live stream.", ["source"],
            list(c.seq_gaps.items()),
        )  # fmt: skip
        yield _counter(
            "kvroute_replays",
            "Replay requests, per source and outcome.",
            ["source", "outcome"],
            list(c.replays.items()),
        )
        yield _counter(
            "kvroute_source_resets",
            "Source state drops, per cause.",
            ["source", "cause"],
            list(c.resets.items()),
        )
        yield _counter(
            "kvroute_rank_mismatches",
            "Batches whose data_parallel_rank disagrees with their socket's DP rank "
            "(applied to the socket's source).",
            ["source"],
            list(c.rank_mismatches.items()),
        )
        yield _counter(
            "kvroute_handshake_failures",
            "ZeroMQ handshakes with a source that failed (CURVE: a key mismatch, or a "
            "publisher without the server key); the source stays disconnected.",
            ["source"],
            list(c.handshake_failures.items()),
        )


class _StateCollector(Collector):
    """Gauges (and the stale-time counter) read from the running parts at scrape time; each part
    is attached with one of `Metrics.watch_*` by whoever builds it (gateway/app.py)."""

    def __init__(self) -> None:
        self.sources: Callable[[], Iterable[SourceStatus]] | None = None
        self.silent: Callable[[], AbstractSet[SourceId]] | None = None
        self.index_blocks: Callable[[], Mapping[str, int]] | None = None
        self.index_memory: Callable[[], Mapping[str, int]] | None = None
        self.index_impl = ""
        self.engines: Callable[[], Iterable[tuple[str, bool]]] | None = None
        self.fleet_reloads: Mapping[str, int] | None = None
        self.discovery_errors: Mapping[str, int] | None = None
        self.engine_loads: Callable[[], Iterable[tuple[str, int, int]]] | None = None
        self.engine_states: Callable[[], Iterable[EngineGauges]] | None = None
        self.shared: _SharedStateView | None = None
        self.snapshots: _SnapshotView | None = None
        self.tokenizer_cache: Callable[[], tuple[int, int, int]] | None = None
        self.piece_cache: Callable[[], tuple[int, int, int]] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.sources is not None:
            stale = GaugeMetricFamily(
                "kvroute_source_stale",
                "1 while a source is stale (not used for routing).",
                labels=["source"],
            )
            stale_s = CounterMetricFamily(
                "kvroute_source_stale_seconds", "Time spent stale, per source.", labels=["source"]
            )
            last_seq = GaugeMetricFamily(
                "kvroute_source_last_seq", "Last applied sequence number.", labels=["source"]
            )
            quiet = GaugeMetricFamily(
                "kvroute_source_quiet_seconds",
                "Time since the source's socket last received a message (or connected).",
                labels=["source"],
            )
            silent = GaugeMetricFamily(
                "kvroute_source_silent",
                "1 while a source receives nothing although its engine answers requests "
                "(silent_source_s): a topic, endpoint or engine setting keeps its events away.",
                labels=["source"],
            )
            flagged = self.silent() if self.silent is not None else frozenset()
            for s in self.sources():
                stale.add_metric([s.source], 1.0 if s.stale else 0.0)
                stale_s.add_metric([s.source], s.stale_seconds)
                if s.last_seq is not None:
                    last_seq.add_metric([s.source], float(s.last_seq))
                quiet.add_metric([s.source], s.quiet_s)
                silent.add_metric([s.source], 1.0 if s.source in flagged else 0.0)
            yield stale
            yield stale_s
            yield last_seq
            yield quiet
            yield silent
        if self.index_blocks is not None:
            blocks = GaugeMetricFamily(
                "kvroute_index_blocks", "Distinct blocks held in the index, per model.",
                labels=["model"],
            )  # fmt: skip
            for model, n in self.index_blocks().items():
                blocks.add_metric([model], float(n))
            yield blocks
        if self.index_memory is not None:
            mem = self.index_memory()
            size = GaugeMetricFamily(
                "kvroute_index_bytes",
                "Index memory: accounted (entries x the implementation's measured cost per "
                "entry, what the budget bounds) and allocated (native tables; 0 in Python).",
                labels=["kind"],
            )
            size.add_metric(["accounted"], float(mem["accounted"]))
            size.add_metric(["allocated"], float(mem["allocated"]))
            yield size
            yield GaugeMetricFamily(
                "kvroute_index_budget_bytes",
                "The index's memory budget (max_index_bytes).",
                value=float(mem["budget"]),
            )
            yield GaugeMetricFamily(
                "kvroute_index_entries",
                "(block, source) entries held, over all sources.",
                value=float(mem["entries"]),
            )
            info = GaugeMetricFamily(
                "kvroute_index_info", "1, labelled with the index implementation.", labels=["impl"]
            )
            info.add_metric([self.index_impl], 1.0)
            yield info
        if self.engines is not None:
            healthy = GaugeMetricFamily(
                "kvroute_engine_healthy",
                "1 while an engine passes its health checks.",
                labels=["engine"],
            )
            for name, ok in self.engines():
                healthy.add_metric([name], 1.0 if ok else 0.0)
            yield healthy
        if self.fleet_reloads is not None:
            yield _counter(
                "kvroute_fleet_reloads",
                "Fleet updates from the fleet file (or another fleet source), per outcome "
                "(ok, error).",
                ["outcome"],
                list(self.fleet_reloads.items()),
            )
        if self.discovery_errors is not None:
            yield _counter(
                "kvroute_discovery_errors",
                "Kubernetes discovery failures, per reason (gone, forbidden, api, connection, "
                "pod).",
                ["reason"],
                list(self.discovery_errors.items()),
            )
        if self.engine_loads is not None:
            requests = GaugeMetricFamily(
                "kvroute_engine_load_requests",
                "Requests at an engine as routing counts them (load_source).",
                labels=["engine"],
            )
            tokens = GaugeMetricFamily(
                "kvroute_engine_load_tokens",
                "The same load in prompt + max output tokens (the kv_aware cost's unit).",
                labels=["engine"],
            )
            for name, n_requests, n_tokens in self.engine_loads():
                requests.add_metric([name], float(n_requests))
                tokens.add_metric([name], float(n_tokens))
            yield requests
            yield tokens
        if self.engine_states is not None:
            yield from _engine_gauges(self.engine_states())
        if self.shared is not None:
            yield from self.shared.collect()
        if self.snapshots is not None:
            yield from self.snapshots.collect()
        if self.tokenizer_cache is not None:
            yield from _cache_series(
                self.tokenizer_cache(),
                ("kvroute_tokenizer_cache_lookups", "Tokenizer cache lookups, per result "
                 "(hit, miss: tokenized locally or remotely)."),
                ("kvroute_tokenizer_cache_entries", "Tokenized prompts the cache holds (at most "
                 "tokenizer_cache_size)."),
            )  # fmt: skip
        if self.piece_cache is not None:
            yield from _cache_series(
                self.piece_cache(),
                ("kvroute_tokenizer_piece_lookups", "Text pieces the local tokenizer looked up, "
                 "per result (hit; miss: encoded)."),
                ("kvroute_tokenizer_piece_cache_bytes", "Estimated size of the local "
                 "tokenizer's piece cache (at most tokenizer_piece_cache_bytes)."),
            )  # fmt: skip


# (engine, requests this replica has in flight there, the engine's last scraped `vllm:` gauges)
EngineGauges: TypeAlias = tuple[str, int, Mapping[str, float]]
# The scraped gauges re-exported per engine: kvroute name, help, the engine's gauge.
_SCRAPED: Final = (
    ("kvroute_engine_running_requests", "Requests the engine runs (its last scrape).",
     "vllm:num_requests_running"),
    ("kvroute_engine_waiting_requests", "Requests queued at the engine (its last scrape).",
     "vllm:num_requests_waiting"),
    ("kvroute_engine_kv_cache_usage", "The engine's KV-cache usage, 0 to 1 (its last scrape).",
     "vllm:kv_cache_usage_perc"),
    ("kvroute_engine_kv_pool_blocks",
     "Blocks of the engine's KV pools, its vllm:cache_config_info num_gpu_blocks (last scrape).",
     "vllm:cache_config_info:num_gpu_blocks"),
)  # fmt: skip


def _engine_gauges(engines: Iterable[EngineGauges]) -> Iterator[Metric]:
    in_flight = GaugeMetricFamily(
        "kvroute_engine_in_flight_requests",
        "Requests this gateway has in flight at each engine.",
        labels=["engine"],
    )
    scraped = [GaugeMetricFamily(name, doc, labels=["engine"]) for name, doc, _ in _SCRAPED]
    for name, n, gauges in engines:
        in_flight.add_metric([name], float(n))
        for family, (_, _, key) in zip(scraped, _SCRAPED, strict=True):
            value = gauges.get(key)
            if value is not None:
                family.add_metric([name], value)
    yield in_flight
    yield from scraped


class _SharedStateView:
    """The shared store's state (fleet/shared_state.py), read at scrape time."""

    def __init__(
        self,
        errors: Mapping[str, int],
        dropped: Mapping[str, int],
        claims: Mapping[str, int],
        load_updates: Mapping[str, int],
        status: Callable[[], tuple[bool, int]],
    ) -> None:
        self.errors = errors
        self.dropped = dropped
        self.claims = claims
        self.load_updates = load_updates
        self.status = status

    def collect(self) -> Iterator[Metric]:
        up, peers = self.status()
        yield GaugeMetricFamily(
            "kvroute_shared_state_up",
            "1 while the shared store answers (its last sync succeeded).",
            value=1.0 if up else 0.0,
        )
        yield GaugeMetricFamily(
            "kvroute_shared_state_peers",
            "Other replicas whose in-flight counts this replica holds (live keys, newer messages).",
            value=float(peers),
        )
        yield _counter(
            "kvroute_shared_state_errors",
            "Failed shared store operations, per op (sync, publish, subscribe).",
            ["op"],
            list(self.errors.items()),
        )
        yield _counter(
            "kvroute_shared_state_dropped",
            "Speculative claims or store entries not shared, per reason (store_down, backlog, "
            "malformed, unknown_engine, error).",
            ["reason"],
            list(self.dropped.items()),
        )
        yield _counter(
            "kvroute_shared_speculative_claims",
            "Speculative claims shared with the other replicas, per direction (sent, received).",
            ["direction"],
            list(self.claims.items()),
        )
        yield _counter(
            "kvroute_shared_load_updates",
            "In-flight count messages exchanged with the other replicas, per direction (sent, "
            "received newer than what this replica held).",
            ["direction"],
            list(self.load_updates.items()),
        )


class _SnapshotView:
    """Snapshot writing and loading (persist/writer.py `SnapshotStats`), read at scrape time."""

    def __init__(
        self,
        stats: Callable[[], Mapping[str, float]],
        refused: Mapping[str, int],
        unconfirmed: Callable[[], int],
    ) -> None:
        self.stats = stats
        self.refused = refused
        self.unconfirmed = unconfirmed

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        yield _counter(
            "kvroute_snapshot_writes",
            "Snapshot writes, per result (ok, failed: the previous file is kept).",
            ["result"],
            [("ok", int(s["written"])), ("failed", int(s["failed"]))],
        )
        yield _counter(
            "kvroute_snapshot_refused",
            "Snapshots refused at start, per reason (corrupt, truncated, version, fleet, "
            "unreadable); the gateway started cold.",
            ["reason"],
            list(self.refused.items()),
        )
        yield GaugeMetricFamily(
            "kvroute_snapshot_bytes", "Size of the last snapshot written.", value=s["last_bytes"]
        )
        yield GaugeMetricFamily(
            "kvroute_snapshot_write_seconds",
            "Time the last snapshot took, fork to file in place.",
            value=s["last_write_s"],
        )
        pause = GaugeMetricFamily(
            "kvroute_snapshot_pause_seconds",
            "How long the event loop stood still for a snapshot (the fork), last and max.",
            labels=["stat"],
        )
        pause.add_metric(["last"], s["last_pause_s"])
        pause.add_metric(["max"], s["max_pause_s"])
        yield pause
        yield GaugeMetricFamily(
            "kvroute_snapshot_unconfirmed_sources",
            "Sources restored from the snapshot that their engine has not confirmed yet.",
            value=float(self.unconfirmed()),
        )


class Metrics:
    """All kvroute metrics on one registry. Build one per process (or per test) and pass it in."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.event_counters = EventCounters()
        r.register(_EventCountersCollector(self.event_counters))
        self._state = _StateCollector()
        r.register(self._state)
        self.requests = Counter(
            "kvroute_requests",
            "Proxied requests, per engine, policy and status.",
            ["engine", "policy", "status"],
            registry=r,
        )
        self.route_decision_seconds = Histogram(
            "kvroute_route_decision_seconds",
            "Time to choose an engine (match + score), per policy.",
            ["policy"],
            buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2),
            registry=r,
        )
        # A proxied request's latency as the client sees it, to its last byte (gateway/exchange.py).
        self.request_duration = Histogram(
            "kvroute_request_duration_seconds",
            "Proxied requests from arrival to the last byte sent, per engine and policy.",
            ["engine", "policy"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_byte = Histogram(
            "kvroute_time_to_first_byte_seconds",
            "Streamed requests from arrival to the first chunk sent, per engine and policy.",
            ["engine", "policy"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "kvroute_upstream_duration_seconds",
            "Time an engine took, from sending it the request to its answer's last byte.",
            ["engine"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        build = Gauge(
            "kvroute_build_info",
            "Always 1; the labels say which kvroute and Python run.",
            ["version", "python"],
            registry=r,
        )
        build.labels(__version__, platform.python_version()).set(1)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes...
        PlatformCollector(registry=r)  # python_info
        self.tokenize_seconds = Histogram(
            "kvroute_tokenize_seconds",
            "Time to tokenize a request, per mode (cache, local, remote).",
            ["mode"],
            buckets=(1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0),
            registry=r,
        )
        self.tokenize_failures = Counter(
            "kvroute_tokenize_failures",
            "Requests routed by load because tokenization failed.",
            registry=r,
        )
        self.prefix_hit_tokens = Counter(
            "kvroute_prefix_hit_tokens",
            "Prompt tokens the chosen engine held, per engine (policies that read tokens).",
            ["engine"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "kvroute_prompt_tokens",
            "Prompt tokens of proxied requests, per engine (prefix_hit_tokens' denominator; "
            "estimated where the policy does not tokenize).",
            ["engine"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "kvroute_upstream_retries",
            "Requests retried on the next-best engine.",
            ["engine"],
            registry=r,
        )
        self.prompts_offloaded = Counter(
            "kvroute_prompts_offloaded",
            "Request bodies parsed (and tokenized, locally) by a prompt worker, off the loop.",
            registry=r,
        )
        self.http_timeouts = Counter(
            "kvroute_http_timeouts",
            "Clients too slow to send a request, per phase: header (connection closed after "
            "header_timeout_s), body (408 after body_timeout_s).",
            ["phase"],
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, and its content type (for `GET /metrics`)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # --- state read at scrape time

    def watch_sources(self, sources: Callable[[], Iterable[SourceStatus]]) -> None:
        """Export each source's staleness, stale time and last seq from `sources()`."""
        self._state.sources = sources

    def watch_tokenizer_cache(self, stats: Callable[[], tuple[int, int, int]]) -> None:
        """Export `kvroute_tokenizer_cache_lookups_total{result}` and
        `kvroute_tokenizer_cache_entries` from `stats()`: (hits, misses, entries)."""
        self._state.tokenizer_cache = stats

    def watch_piece_cache(self, stats: Callable[[], tuple[int, int, int]]) -> None:
        """Export `kvroute_tokenizer_piece_lookups_total{result}` and
        `kvroute_tokenizer_piece_cache_bytes` from `stats()`: (hits, misses, bytes)."""
        self._state.piece_cache = stats

    def watch_silence(self, silent: Callable[[], AbstractSet[SourceId]]) -> None:
        """Export `kvroute_source_silent{source}` from `silent()` (gateway/silence.py)."""
        self._state.silent = silent

    def watch_index(
        self,
        blocks_by_model: Callable[[], Mapping[str, int]],
        memory: Callable[[], Mapping[str, int]] | None = None,
        impl: str = "",
    ) -> None:
        """Export `kvroute_index_blocks{model}` from `blocks_by_model()` and, given `memory`
        (`PrefixIndex.memory`), `kvroute_index_bytes{kind}`, `kvroute_index_budget_bytes`,
        `kvroute_index_entries` and `kvroute_index_info{impl}`."""
        self._state.index_blocks = blocks_by_model
        self._state.index_memory = memory
        self._state.index_impl = impl

    def watch_fleet(
        self, engines: Callable[[], Iterable[tuple[str, bool]]], reloads: Mapping[str, int]
    ) -> None:
        """Export `kvroute_engine_healthy` from `engines()` ((name, healthy) pairs) and
        `kvroute_fleet_reloads_total` from `reloads` (outcome -> count)."""
        self._state.engines = engines
        self._state.fleet_reloads = reloads

    def watch_discovery(self, errors: Mapping[str, int]) -> None:
        """Export `kvroute_discovery_errors_total{reason}` from `errors` (reason -> count)."""
        self._state.discovery_errors = errors

    def watch_load(self, loads: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        """Export `kvroute_engine_load_requests` and `_tokens{engine}` from `loads()`
        ((engine, requests, tokens) as routing counts them)."""
        self._state.engine_loads = loads

    def watch_engines(self, engines: Callable[[], Iterable[EngineGauges]]) -> None:
        """Export `kvroute_engine_in_flight_requests{engine}` and the engines' scraped queue
        and KV-usage gauges (`kvroute_engine_running_requests`, `_waiting_requests`,
        `_kv_cache_usage`) from `engines()`."""
        self._state.engine_states = engines

    def watch_shared_state(
        self,
        errors: Mapping[str, int],
        dropped: Mapping[str, int],
        claims: Mapping[str, int],
        load_updates: Mapping[str, int],
        status: Callable[[], tuple[bool, int]],
    ) -> None:
        """Export the shared store's `kvroute_shared_*` metrics: `errors` (op -> count),
        `dropped` (reason -> count), `claims` and `load_updates` (direction -> count),
        `status()` (up, peers)."""
        self._state.shared = _SharedStateView(errors, dropped, claims, load_updates, status)

    def watch_snapshots(
        self,
        stats: Callable[[], Mapping[str, float]],
        refused: Mapping[str, int],
        unconfirmed: Callable[[], int],
    ) -> None:
        """Export `kvroute_snapshot_*`: `stats()` (written, failed, last_bytes, last_write_s,
        last_pause_s, max_pause_s), `refused` (reason -> count), `unconfirmed()` sources."""
        self._state.snapshots = _SnapshotView(stats, refused, unconfirmed)

    def observe_tokenize(self, mode: str, seconds: float) -> None:
        """One tokenization of `mode` (cache, local, remote) took `seconds`."""
        self.tokenize_seconds.labels(mode=mode).observe(seconds)


class _RelayCounters(Protocol):
    """What `RelayMetrics` reads (relay/counters.py `RelayCounters`; metrics does not import
    the relay)."""

    @property
    def forwarded_messages(self) -> int: ...
    @property
    def forwarded_bytes(self) -> int: ...
    @property
    def unforwarded_messages(self) -> int: ...
    @property
    def engine_disconnects(self) -> int: ...
    @property
    def handshakes(self) -> Mapping[tuple[str, str], int]: ...
    @property
    def replays(self) -> Mapping[str, int]: ...
    @property
    def replay_batches(self) -> int: ...
    @property
    def allow_list_keys(self) -> int: ...
    @property
    def allow_list_reloads(self) -> Mapping[str, int]: ...


class _RelayCollector(Collector):
    def __init__(self, counters: _RelayCounters) -> None:
        self._c = counters

    def collect(self) -> Iterator[Metric]:
        c = self._c
        plain = (
            ("kvroute_relay_forwarded_messages", "Live messages forwarded to gateways.",
             c.forwarded_messages),
            ("kvroute_relay_forwarded_bytes", "Bytes of the live messages forwarded.",
             c.forwarded_bytes),
            ("kvroute_relay_unforwarded_messages",
             "Live messages that arrived while the relay's PUB was closed (engine away).",
             c.unforwarded_messages),
            ("kvroute_relay_engine_disconnects", "Times the engine's PUB went away.",
             c.engine_disconnects),
            ("kvroute_relay_replay_messages",
             "Replay reply messages passed to gateways (end markers included).",
             c.replay_batches),
        )  # fmt: skip
        for name, doc, value in plain:
            yield _counter(name, doc, [], [((), float(value))])
        yield _counter(
            "kvroute_relay_handshakes",
            "CURVE handshakes with gateways, per socket and outcome (ok, no_key, unknown_key, "
            "wrong_server_key, aborted, other).",
            ["socket", "outcome"],
            list(c.handshakes.items()),
        )
        yield _counter(
            "kvroute_relay_replays",
            "Replay requests through the relay, per outcome.",
            ["outcome"],
            list(c.replays.items()),
        )
        yield _counter(
            "kvroute_relay_allow_list_reloads",
            "Reloads of the allow-list directory, per outcome (error: a file or the directory "
            "could not be read).",
            ["outcome"],
            list(c.allow_list_reloads.items()),
        )
        yield GaugeMetricFamily(
            "kvroute_relay_allow_list_keys",
            "Gateway public keys in the allow-list.",
            value=float(c.allow_list_keys),
        )


class RelayMetrics:
    """The metrics of `kvroute relay` on a registry of their own, read from its counters at
    scrape time."""

    def __init__(self, counters: _RelayCounters) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_RelayCollector(counters))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
