"""An engine's load as routing sees it: this replica's in-flight requests blended with the
engine's own reported queue and, when a shared store is on, the other replicas' requests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from kvroute.core import LoadSource

__all__ = ["DEFAULT_TOKENS_PER_REQUEST", "EngineLoad", "LoadView", "blend_load"]

DEFAULT_TOKENS_PER_REQUEST: Final = 1024
"""Tokens per request assumed for requests the engine reports before this replica sent any."""


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """Requests at an engine and the same in the cost's unit (prompt + max output tokens)."""

    requests: int
    tokens: int

    def pair(self) -> tuple[int, int]:
        return self.requests, self.tokens


@dataclass(frozen=True, slots=True)
class LoadView:
    """What one replica knows of one engine's load right now.

    `local_*`: this replica's requests in flight there (exact). `reported`: the engine's own
    `num_requests_running + num_requests_waiting` at its last fresh scrape (None: none), and
    `local_at_report` / `shared_at_report` the in-flight requests this replica and (shared
    store on) the other replicas had there when that scrape was sent. `shared_*`: the other
    replicas' requests in flight there as they last published them (None: store off or down).
    """

    local_requests: int
    local_tokens: int
    reported: int | None = None
    local_at_report: int = 0
    shared_requests: int | None = None
    shared_tokens: int = 0
    shared_at_report: int | None = None


def blend_load(view: LoadView, source: LoadSource, tokens_per_request: float) -> EngineLoad:
    """The load routing uses for one engine (docs/design.md §15).

    `local`: the requests kvroute knows it sent (this replica's, plus the other replicas'
    while a shared store is up). `engine`: the engine's last report alone, in tokens at
    `tokens_per_request`. `blended` (default): the known requests plus whatever the engine
    reported beyond what kvroute knew it had sent there at that scrape — other replicas
    without a shared store, clients that bypass kvroute — that is, the report corrected by
    everything this replica (and the store) saw start or end since. Without a fresh report,
    `engine` and `blended` fall back to `local`.
    """
    known_requests = view.local_requests
    known_tokens = view.local_tokens
    shared_at_report = 0
    if view.shared_requests is not None:
        known_requests += view.shared_requests
        known_tokens += view.shared_tokens
        # A store that came up after the scrape was sent: its counts now stand in for then.
        shared_at_report = (
            view.shared_at_report if view.shared_at_report is not None else view.shared_requests
        )
    if source is LoadSource.LOCAL or view.reported is None:
        return EngineLoad(known_requests, known_tokens)
    reported = max(0, view.reported)
    if source is LoadSource.ENGINE:
        return EngineLoad(reported, round(reported * tokens_per_request))
    unaccounted = max(0, reported - view.local_at_report - shared_at_report)
    return EngineLoad(
        known_requests + unaccounted, known_tokens + round(unaccounted * tokens_per_request)
    )
