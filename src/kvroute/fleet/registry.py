"""The engine registry: membership, health probes, in-flight load, scraped `vllm:` gauges."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from kvroute.core import EngineClient, LoadSource
from kvroute.errors import ConfigError, EngineError
from kvroute.fleet.load import DEFAULT_TOKENS_PER_REQUEST, EngineLoad, LoadView, blend_load
from kvroute.fleet.scrape import NUM_REQUESTS_RUNNING, NUM_REQUESTS_WAITING, scan_vllm_gauges
from kvroute.fleet.source import FileFleetSource, FleetSource
from kvroute.fleet.spec import EngineSpec

__all__ = ["ChangeCallback", "EngineState", "Fleet"]

log = logging.getLogger(__name__)

ChangeCallback = Callable[[list[EngineSpec], list[EngineSpec]], Awaitable[None]]
"""Called with (added, removed) specs; a changed engine is in both (old spec in removed)."""

# An engine's report counts for routing while its scrape is younger than this many intervals
# (at least _REPORT_MIN_AGE_S): a few failed scrapes in a row fall back to local load.
_REPORT_INTERVALS: Final = 3
_REPORT_MIN_AGE_S: Final = 1.0
# Weight of each new request in the tokens-per-request average (about the last 50 requests).
_TOKENS_EWMA: Final = 0.02


@dataclass(eq=False)
class EngineState:
    """What the fleet knows about one engine right now (mutated only by the Fleet)."""

    spec: EngineSpec
    healthy: bool = True  # optimistic until `unhealthy_after` consecutive failures
    in_flight_requests: int = 0
    outstanding_tokens: int = 0  # prompt + max output tokens of requests in flight
    served_requests: int = 0  # answered with a status below 400 (gateway/silence.py reads it)
    scraped: dict[str, float] = field(default_factory=dict)  # vllm: gauges of the last scrape
    consecutive_failures: int = 0
    last_error: str | None = None
    scraped_at: float | None = None  # time.monotonic() of the last good scrape
    # In flight there when that scrape was sent: this replica's, the other replicas' (shared).
    scraped_local_requests: int = 0
    scraped_shared_requests: int | None = None
    # The other replicas' requests in flight there, from the shared store (None: off or down).
    shared_requests: int | None = None
    shared_tokens: int = 0

    @property
    def name(self) -> str:
        return self.spec.name


class Fleet:
    """Which engines exist and how they are doing. Build it, `await start()`, `await close()`.

    Health: `client.health` every `health_interval_s`, each probe bounded by `probe_timeout_s`;
    an engine is ejected after `unhealthy_after` consecutive failures (probe failures and proxy
    connect failures reported through `mark_failure`) and re-admitted after one successful
    probe. Load: the proxy calls `begin_request`/`end_request`; the `vllm:` gauges of
    `client.metrics_text` are kept on each engine every `scrape_interval_s`; `load()` blends
    them with the in-flight counts by `load_source` (fleet/load.py), and `set_shared_load`
    brings in the other replicas' counts (fleet/shared_state.py). Membership: a
    `FleetSource` (the fleet file, polled every `watch_interval_s`, when `fleet_file` is given)
    feeds `update()`, which calls the `on_change` callbacks; a broken source is retried after
    `watch_interval_s`. `reloads` counts by outcome ("ok", "error"): the fleet file source each
    read, the fleet each rejected update or broken source. An interval of 0 disables that loop
    (tests drive `check_health()`/`scrape()` directly). Settings (settings.py) own the defaults.
    """

    def __init__(
        self,
        specs: list[EngineSpec],
        client: EngineClient,
        *,
        health_interval_s: float,
        unhealthy_after: int,
        scrape_interval_s: float,
        watch_interval_s: float,
        probe_timeout_s: float = 2.0,
        fleet_file: Path | None = None,
        source: FleetSource | None = None,
        load_source: LoadSource = LoadSource.LOCAL,
    ) -> None:
        if unhealthy_after < 1:
            raise ConfigError(f"unhealthy_after: expected >= 1, got {unhealthy_after}")
        try:
            self.load_source = LoadSource(load_source)
        except ValueError as exc:
            expected = ", ".join(LoadSource)
            raise ConfigError(
                f"load_source: expected one of {expected}, got {load_source!r}"
            ) from exc
        self._tokens_per_request: float | None = None
        self._report_max_age_s = max(_REPORT_INTERVALS * scrape_interval_s, _REPORT_MIN_AGE_S)
        self._client = client
        self._health_interval_s = health_interval_s
        self._unhealthy_after = unhealthy_after
        self._scrape_interval_s = scrape_interval_s
        self._probe_timeout_s = probe_timeout_s
        self._watch_interval_s = watch_interval_s
        self.reloads: collections.Counter[str] = collections.Counter()
        if source is None and fleet_file is not None:
            source = FileFleetSource(fleet_file, interval_s=watch_interval_s, reloads=self.reloads)
        self._source = source
        self._engines: dict[str, EngineState] = {}
        self._callbacks: list[ChangeCallback] = []
        # Called after every change of this replica's in-flight counts (the shared store
        # pushes them to the other replicas at once: fleet/shared_state.py).
        self._load_listeners: list[Callable[[], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._created = int(time.time())
        for spec in _unique(specs):
            self._engines[spec.name] = EngineState(spec=spec)

    # ---- reading -------------------------------------------------------------------------

    def engines(self) -> list[EngineState]:
        return list(self._engines.values())

    def get(self, name: str) -> EngineState | None:
        return self._engines.get(name)

    def specs(self) -> list[EngineSpec]:
        return [state.spec for state in self._engines.values()]

    def engines_for_model(self, model: str) -> tuple[str, list[EngineState]]:
        """(base model, engines serving it) for a base model or a LoRA adapter name; unknown
        names give (model, []). Unhealthy engines are included: the caller tells 404 from 503."""
        serving = [s for s in self._engines.values() if s.spec.model == model]
        if serving:
            return model, serving
        with_lora = [s for s in self._engines.values() if model in s.spec.lora]
        if not with_lora:
            return model, []
        base = min(s.spec.model for s in with_lora)  # an adapter name under two bases: pick one
        return base, [s for s in with_lora if s.spec.model == base]

    def url_for_model(self, model: str) -> str | None:
        """Base URL of a healthy engine serving `model` (a base model or LoRA name), the one
        with the fewest requests in flight; None when none is healthy. Fits RemoteTokenizer."""
        _base, serving = self.engines_for_model(model)
        healthy = [s for s in serving if s.healthy]
        if not healthy:
            return None
        return min(healthy, key=lambda s: (s.in_flight_requests, s.name)).spec.url

    def models(self) -> list[dict[str, Any]]:
        """OpenAI `/v1/models` data: every base model, then its adapters with `parent` set."""
        bases: dict[str, set[str]] = {}
        for state in self._engines.values():
            bases.setdefault(state.spec.model, set()).update(state.spec.lora)
        cards: list[dict[str, Any]] = []
        for base in sorted(bases):
            cards.append(self._card(base, None))
            cards.extend(self._card(lora, base) for lora in sorted(bases[base] - bases.keys()))
        return cards

    def _card(self, model_id: str, parent: str | None) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": self._created,
            "owned_by": "kvroute",
            "root": model_id,
            "parent": parent,
        }

    # ---- load --------------------------------------------------------------------------------

    @property
    def tokens_per_request(self) -> float:
        """A moving average of this replica's requests' prompt + max output tokens: the size
        given to each request an engine reports that no replica accounted for."""
        if self._tokens_per_request is None:
            return float(DEFAULT_TOKENS_PER_REQUEST)
        return self._tokens_per_request

    def load(self, state: EngineState, now: float | None = None) -> EngineLoad:
        """`state`'s load for routing, blended by `load_source` (fleet/load.py). Reads memory
        only: the scrape and the shared store are refreshed by their own loops."""
        reported: int | None = None
        running = self.fresh_gauge(state, NUM_REQUESTS_RUNNING, now)
        if running is not None:
            waiting = state.scraped.get(NUM_REQUESTS_WAITING, 0.0)
            total = running + waiting
            reported = int(total) if total < 1e12 else None  # +Inf or nonsense: no report
        view = LoadView(
            local_requests=state.in_flight_requests,
            local_tokens=state.outstanding_tokens,
            reported=reported,
            local_at_report=state.scraped_local_requests,
            shared_requests=state.shared_requests,
            shared_tokens=state.shared_tokens,
            shared_at_report=state.scraped_shared_requests,
        )
        return blend_load(view, self.load_source, self.tokens_per_request)

    def fresh_gauge(self, state: EngineState, name: str, now: float | None = None) -> float | None:
        """Gauge `name` of `state`'s last scrape while that scrape is fresh, else None."""
        now = time.monotonic() if now is None else now
        if state.scraped_at is None or now - state.scraped_at > self._report_max_age_s:
            return None
        return state.scraped.get(name)

    def local_loads(self) -> dict[str, tuple[int, int]]:
        """This replica's (requests, tokens) in flight per engine, for the shared store."""
        return {
            name: (s.in_flight_requests, s.outstanding_tokens)
            for name, s in self._engines.items()
            if s.in_flight_requests or s.outstanding_tokens
        }

    def on_local_load(self, listener: Callable[[], None]) -> None:
        """Call `listener` (synchronously, so it must only note the change) whenever this
        replica's in-flight counts change."""
        self._load_listeners.append(listener)

    def set_shared_load(self, others: Mapping[str, tuple[int, int]] | None) -> None:
        """The other replicas' (requests, tokens) in flight per engine, summed; None while the
        shared store is off or down (routing then leaves them out)."""
        for name, state in self._engines.items():
            if others is None:
                state.shared_requests, state.shared_tokens = None, 0
                state.scraped_shared_requests = None
            else:
                state.shared_requests, state.shared_tokens = others.get(name, (0, 0))

    # ---- load and health, reported by the proxy ----------------------------------------------

    def begin_request(self, engine: str, tokens: int) -> None:
        state = self._engines.get(engine)
        if state is not None:
            state.in_flight_requests += 1
            state.outstanding_tokens += max(0, tokens)
            self._local_load_changed()
        if tokens > 0:
            avg = self._tokens_per_request
            self._tokens_per_request = (
                float(tokens) if avg is None else avg + _TOKENS_EWMA * (tokens - avg)
            )

    def served_requests(self, engine: str) -> int:
        """Requests `engine` answered with a status below 400 (0 for an unknown engine)."""
        state = self._engines.get(engine)
        return 0 if state is None else state.served_requests

    def note_served(self, engine: str) -> None:
        """The engine answered a request routed to it (a status below 400)."""
        state = self._engines.get(engine)
        if state is not None:
            state.served_requests += 1

    def end_request(self, engine: str, tokens: int) -> None:
        state = self._engines.get(engine)
        if state is not None:
            state.in_flight_requests = max(0, state.in_flight_requests - 1)
            state.outstanding_tokens = max(0, state.outstanding_tokens - max(0, tokens))
            self._local_load_changed()

    def _local_load_changed(self) -> None:
        for listener in self._load_listeners:
            listener()

    def mark_failure(self, engine: str, reason: str = "proxy connect failure") -> None:
        state = self._engines.get(engine)
        if state is not None:
            self._failed(state, reason)

    def _failed(self, state: EngineState, reason: str) -> None:
        state.consecutive_failures += 1
        state.last_error = reason
        if state.healthy and state.consecutive_failures >= self._unhealthy_after:
            state.healthy = False
            log.warning(
                "engine %s ejected after %d failures: %s",
                state.name,
                state.consecutive_failures,
                reason,
            )

    def _succeeded(self, state: EngineState) -> None:
        state.consecutive_failures = 0
        state.last_error = None
        if not state.healthy:
            state.healthy = True
            log.info("engine %s re-admitted", state.name)

    # ---- periodic work -----------------------------------------------------------------------

    async def check_health(self) -> None:
        """One probe round over every engine, concurrently."""
        await asyncio.gather(*(self._probe(state) for state in list(self._engines.values())))

    async def _probe(self, state: EngineState) -> None:
        try:
            status = await self._client.health(state.spec.url, timeout_s=self._probe_timeout_s)
        except EngineError as exc:
            reason = str(exc)
            ok = False
        else:
            reason = f"GET {state.spec.url}/health: status {status}"
            ok = status == 200
        if self._engines.get(state.name) is not state:
            return  # removed or replaced while probing
        if ok:
            self._succeeded(state)
        else:
            self._failed(state, reason)

    async def scrape(self) -> None:
        """One `/metrics` scrape round over every engine, concurrently."""
        await asyncio.gather(*(self._scrape(state) for state in list(self._engines.values())))

    async def _scrape(self, state: EngineState) -> None:
        # What kvroute had in flight there as the request leaves: the engine's answer counts
        # these (and, roughly, nothing sent after), so `load()` can add only what is newer.
        local_at = state.in_flight_requests
        shared_at = state.shared_requests
        try:
            text = await self._client.metrics_text(state.spec.url, timeout_s=self._probe_timeout_s)
            gauges = scan_vllm_gauges(text)
        except EngineError as exc:
            log.debug("scrape of %s failed: %s", state.name, exc)
            return
        if self._engines.get(state.name) is state:
            # The engine answered at some moment between the send and now: a request that
            # started meanwhile may be in its count, and counting it again as the engine's own
            # would double it until the next scrape. So the larger count of the two moments
            # (a request that ended meanwhile is then missed for a scrape interval, at most).
            local_at = max(local_at, state.in_flight_requests)
            if shared_at is not None and state.shared_requests is not None:
                shared_at = max(shared_at, state.shared_requests)
            state.scraped = gauges
            state.scraped_at = time.monotonic()
            state.scraped_local_requests = local_at
            state.scraped_shared_requests = shared_at

    # ---- membership --------------------------------------------------------------------------

    def on_change(self, callback: ChangeCallback) -> None:
        self._callbacks.append(callback)

    async def update(self, specs: list[EngineSpec]) -> tuple[list[EngineSpec], list[EngineSpec]]:
        """Make `specs` the fleet; returns and reports (added, removed). A changed engine keeps
        its in-flight counts but starts healthy again with a fresh failure count."""
        wanted = {spec.name: spec for spec in _unique(specs)}
        removed = [s.spec for name, s in self._engines.items() if wanted.get(name) != s.spec]
        added = [
            spec
            for name, spec in wanted.items()
            if name not in self._engines or self._engines[name].spec != spec
        ]
        if not added and not removed:
            return [], []
        engines: dict[str, EngineState] = {}
        for name, spec in wanted.items():
            old = self._engines.get(name)
            if old is not None and old.spec == spec:
                engines[name] = old
                continue
            state = EngineState(spec=spec)
            if old is not None:
                state.in_flight_requests = old.in_flight_requests
                state.outstanding_tokens = old.outstanding_tokens
                state.shared_requests = old.shared_requests
                state.shared_tokens = old.shared_tokens
            engines[name] = state
        self._engines = engines
        log.info(
            "fleet changed: added %s, removed %s",
            [s.name for s in added],
            [s.name for s in removed],
        )
        for callback in list(self._callbacks):
            try:
                await callback(added, removed)
            except Exception:  # one broken listener must not stop the fleet from updating
                log.exception("fleet on_change callback failed")
        return added, removed

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._tasks:
            return
        if self._health_interval_s > 0:
            self._tasks.append(
                asyncio.create_task(self._every(self._health_interval_s, self.check_health))
            )
        if self._scrape_interval_s > 0:
            self._tasks.append(
                asyncio.create_task(self._every(self._scrape_interval_s, self.scrape))
            )
        if self._source is not None:
            self._tasks.append(asyncio.create_task(self._watch(self._source)))

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    async def _every(interval_s: float, work: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await work()
            except Exception:  # keep probing whatever one round did
                log.exception("fleet periodic task failed")
            await asyncio.sleep(interval_s)

    async def _watch(self, source: FleetSource) -> None:
        while True:
            try:
                async for specs in source.watch():
                    try:
                        await self.update(specs)
                    except ConfigError as exc:
                        log.warning("fleet update rejected, keeping the current fleet: %s", exc)
                        self.reloads["error"] += 1
                return  # the source ended: the fleet stays as it is
            except Exception:  # a broken source (API down, bug) is retried, never fatal
                log.exception("fleet source failed; retrying in %s s", self._watch_interval_s)
                self.reloads["error"] += 1
            await asyncio.sleep(self._watch_interval_s)


def _unique(specs: list[EngineSpec]) -> list[EngineSpec]:
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(
                f"fleet: engine {spec.name!r}: field 'name': expected unique, got a duplicate"
            )
        seen.add(spec.name)
    return specs
