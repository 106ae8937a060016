"""Why events are dropped, sources reset and replays end (the metric labels), and the plain int
counters the event path keeps; `kvroute.metrics` exports them when /metrics is scraped."""

from __future__ import annotations

import collections
import enum

__all__ = ["DropReason", "EventCounters", "ReplayOutcome", "ResetCause"]


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
    # a batch at or before a seq already applied: replay overlap, or live backlog older
    # than the bootstrap that superseded it
    DUPLICATE = "duplicate"
    UNKNOWN_SOURCE = "unknown_source"  # index.apply for a source never added (or removed)
    UNKNOWN_BLOCK = "unknown_block"  # BlockRemoved of a hash the source does not hold
    # a live batch refused before decoding: its source is over its ingest budget (per batch)
    OVER_BUDGET = "over_budget"
    # a decoded batch with more events or blocks than a source may send in one (per event)
    TOO_LARGE = "too_large"


class ResetCause(enum.StrEnum):
    """Why a source's state was dropped: the `cause` label."""

    SEQ_BACKWARDS = "seq_backwards"  # the live seq went backwards: the engine restarted
    DISCONNECT = "disconnect"  # the SUB socket lost its connection (ZMQ monitor)
    ALL_BLOCKS_CLEARED = "all_blocks_cleared"  # the engine said so
    REMOVED = "removed"  # the source left the fleet
    RESYNC = "resync"  # a gap replay could not close (buffer moved on): start over as a late joiner
    UNCONFIRMED = "unconfirmed"  # blocks restored from a snapshot that the engine did not confirm


class ReplayOutcome(enum.StrEnum):
    """How one replay request ended: the `outcome` label."""

    OK = "ok"
    PARTIAL = "partial"  # the buffer no longer reached the requested seq
    TIMEOUT = "timeout"  # deadline passed or the end marker was lost
    NO_ENDPOINT = "no_endpoint"
    ERROR = "error"
    OVER_BUDGET = "over_budget"  # stopped where the source's ingest budget ran out
    TRUNCATED = "truncated"  # the reply passed its batch or byte limit: the rest was not read


class EventCounters:
    """Plain int counters of the event path, keyed by source (and label).

    Incrementing a dict entry costs a fraction of a prometheus Counter; `kvroute.metrics`
    exports them at scrape time as `kvroute_event_batches_total`, `kvroute_events_applied_total`,
    `kvroute_events_dropped_total`, `kvroute_seq_gaps_total`, `kvroute_replays_total`,
    `kvroute_source_resets_total`, `kvroute_rank_mismatches_total` and
    `kvroute_handshake_failures_total`.
    """

    __slots__ = (
        "applied",
        "batches",
        "dropped",
        "handshake_failures",
        "rank_mismatches",
        "replays",
        "resets",
        "seq_gaps",
    )

    def __init__(self) -> None:
        self.batches: collections.Counter[str] = collections.Counter()  # source
        self.applied: collections.Counter[tuple[str, str]] = collections.Counter()  # source, type
        self.dropped: collections.Counter[tuple[str, str]] = collections.Counter()  # source, reason
        self.seq_gaps: collections.Counter[str] = collections.Counter()  # source
        self.replays: collections.Counter[tuple[str, str]] = (
            collections.Counter()
        )  # source, outcome
        self.resets: collections.Counter[tuple[str, str]] = collections.Counter()  # source, cause
        self.rank_mismatches: collections.Counter[str] = collections.Counter()  # source
        # source: ZeroMQ handshakes that failed (CURVE: a key mismatch, or no key on one side)
        self.handshake_failures: collections.Counter[str] = collections.Counter()

    def drop(self, source: str, reason: DropReason, n: int = 1) -> None:
        self.dropped[(source, reason.value)] += n

    def replay(self, source: str, outcome: ReplayOutcome) -> None:
        self.replays[(source, outcome.value)] += 1

    def reset(self, source: str, cause: ResetCause) -> None:
        self.resets[(source, cause.value)] += 1
