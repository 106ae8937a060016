"""Every Prometheus metric kvroute exports, defined once, registered on an explicit registry."""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["DropReason", "EventCounters", "Metrics", "ReplayOutcome", "ResetCause"]


class DropReason(enum.StrEnum):
    """Why an event (or a whole batch) was not applied to the index: the `reason` label."""

    MALFORMED = "malformed"  # the payload could not be decoded (WireError)
    UNKNOWN_TAG = "unknown_tag"  # an event kind we do not know; skipped by the decoder
    ORPHAN = "orphan"  # BlockStored whose parent hash this source never stored
    MISALIGNED = "misaligned"  # len(token_ids) != blocks * block_size
    UNSUPPORTED_EXTRA_KEYS = "unsupported_extra_keys"  # multimodal / prompt-embeds keys
    WRONG_GROUP = "wrong_group"  # a KV-cache group other than the indexed one
    STALE_SOURCE = "stale_source"  # arrived while the source was stale and not recoverable
    OVER_LIMIT = "over_limit"  # evicted by a per-source or global block cap
    DUPLICATE = "duplicate"  # a batch seq already applied (replay overlap)
    UNKNOWN_SOURCE = "unknown_source"  # index.apply for a source never added (or removed)
    UNKNOWN_BLOCK = "unknown_block"  # BlockRemoved of a hash the source does not hold


class ResetCause(enum.StrEnum):
    """Why a source's state was dropped: the `cause` label."""

    SEQ_BACKWARDS = "seq_backwards"  # seq <= last outside replay: the engine restarted
    DISCONNECT = "disconnect"  # the SUB socket lost its connection (ZMQ monitor)
    ALL_BLOCKS_CLEARED = "all_blocks_cleared"  # the engine said so
    REMOVED = "removed"  # the source left the fleet
    RESYNC = "resync"  # a gap replay could not close (buffer moved on): start over as a late joiner


class ReplayOutcome(enum.StrEnum):
    """How one replay request ended: the `outcome` label."""

    OK = "ok"
    PARTIAL = "partial"  # the buffer no longer reached the requested seq
    TIMEOUT = "timeout"  # deadline passed or the end marker was lost
    NO_ENDPOINT = "no_endpoint"
    ERROR = "error"


class EventCounters:
    """Plain int counters for the event hot path (index.apply, subscriber receive loop).

    Incrementing a dict entry costs a fraction of a prometheus Counter; they are exported as
    `kvroute_event_batches_total`, `kvroute_events_applied_total` and
    `kvroute_events_dropped_total` when /metrics is scraped.
    """

    __slots__ = ("applied", "batches", "dropped")

    def __init__(self) -> None:
        self.batches: collections.Counter[str] = collections.Counter()  # source
        self.applied: collections.Counter[tuple[str, str]] = collections.Counter()  # source, type
        self.dropped: collections.Counter[tuple[str, str]] = collections.Counter()  # source, reason

    def drop(self, source: str, reason: DropReason, n: int = 1) -> None:
        self.dropped[(source, reason.value)] += n


class _EventCountersCollector(Collector):
    def __init__(self, counters: EventCounters) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        batches = CounterMetricFamily(
            "kvroute_event_batches", "Event batches received, per source.", labels=["source"]
        )
        for source, n in list(self._counters.batches.items()):
            batches.add_metric([source], n)
        applied = CounterMetricFamily(
            "kvroute_events_applied",
            "Events applied to the index, per source and event type.",
            labels=["source", "type"],
        )
        for (source, kind), n in list(self._counters.applied.items()):
            applied.add_metric([source, kind], n)
        dropped = CounterMetricFamily(
            "kvroute_events_dropped",
            "Events or batches not applied, per source and reason.",
            labels=["source", "reason"],
        )
        for (source, reason), n in list(self._counters.dropped.items()):
            dropped.add_metric([source, reason], n)
        yield batches
        yield applied
        yield dropped


class Metrics:
    """All kvroute metrics on one registry. Build one per process (or per test) and pass it in."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.event_counters = EventCounters()
        r.register(_EventCountersCollector(self.event_counters))
        self.seq_gaps = Counter(
            "kvroute_seq_gaps", "Sequence gaps detected on the live stream.", ["source"], registry=r
        )
        self.replays = Counter(
            "kvroute_replays",
            "Replay requests, per source and outcome.",
            ["source", "outcome"],
            registry=r,
        )
        self.source_resets = Counter(
            "kvroute_source_resets",
            "Source state drops, per cause.",
            ["source", "cause"],
            registry=r,
        )
        self.source_stale = Gauge(
            "kvroute_source_stale",
            "1 while a source is stale (not used for routing).",
            ["source"],
            registry=r,
        )
        self.source_stale_seconds = Counter(
            "kvroute_source_stale_seconds",
            "Time spent stale, per source.",
            ["source"],
            registry=r,
        )
        self.source_last_seq = Gauge(
            "kvroute_source_last_seq", "Last applied sequence number.", ["source"], registry=r
        )
        self.rank_mismatches = Counter(
            "kvroute_rank_mismatches",
            "Batches whose data_parallel_rank disagrees with their socket's DP rank "
            "(applied to the socket's source).",
            ["source"],
            registry=r,
        )
        self.index_blocks = Gauge(
            "kvroute_index_blocks",
            "Distinct blocks held in the index, per model.",
            ["model"],
            registry=r,
        )
        self.requests = Counter(
            "kvroute_requests",
            "Proxied requests, per engine, policy and status.",
            ["engine", "policy", "status"],
            registry=r,
        )
        self.route_decision_seconds = Histogram(
            "kvroute_route_decision_seconds",
            "Time to choose an engine (match + score).",
            buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2),
            registry=r,
        )
        self.tokenize_seconds = Histogram(
            "kvroute_tokenize_seconds",
            "Time to tokenize a request.",
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
            "Prompt tokens the chosen engine held, per engine.",
            ["engine"],
            registry=r,
        )
        self.engine_healthy = Gauge(
            "kvroute_engine_healthy",
            "1 while an engine passes its health checks.",
            ["engine"],
            registry=r,
        )
        self.fleet_reloads = Counter(
            "kvroute_fleet_reloads",
            "Fleet updates from the fleet file (or another fleet source), per outcome (ok, error).",
            ["outcome"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "kvroute_upstream_retries",
            "Requests retried on the next-best engine.",
            ["engine"],
            registry=r,
        )
