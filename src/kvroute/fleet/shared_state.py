"""Replicas share in-flight counts and speculative claims through Redis or Valkey
(`shared_state_url`), off the request path; while the store is down routing goes on locally."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import msgspec

# redis-py's asyncio client (the `shared` extra): the maintained official client, speaks to
# Redis and Valkey alike, pipelines and pub/sub on one connection pool, and typed (py.typed).
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from kvroute.fleet.shared_claim import SpeculativeClaim

__all__ = ["SharedState"]

log = logging.getLogger("kvroute.fleet.shared_state")

# What a store that is down, slow or answering nonsense raises. Anything else is a bug: logged
# with its traceback and counted the same way, and the loop goes on.
_STORE_ERRORS: Final = (RedisError, OSError, asyncio.TimeoutError)
_FORGET_S: Final = 60.0  # a replica missing from the store this long leaves its index set
_MAX_PENDING: Final = 1024  # claims waiting to be published; more are dropped (counted)
_GET_TIMEOUT_S: Final = 1.0  # pub/sub read wake-up (lets a closing loop notice)
_MAX_BACKOFF_S: Final = 2.0  # longest wait between reconnect attempts

Loads = Mapping[str, tuple[int, int]]


class _Claims(msgspec.Struct, array_like=True):
    """One pub/sub message: the claims a replica published in one go."""

    replica: str
    claims: list[tuple[str, str, str | None, str | None, list[int]]]  # engine model lora salt ids


class _Loads(msgspec.Struct, array_like=True):
    """One replica's key: its (requests, tokens) in flight per engine."""

    engines: dict[str, tuple[int, int]]


class SharedState:
    """This replica's side of the shared store. `start()` launches three loops, `close()`
    stops them and deletes this replica's key.

    - sync, every `interval_s`: write this replica's in-flight counts per engine (`loads()`)
      under its own key with a `ttl_s` expiry, then read every other live replica's key and
      hand the per-engine sums to `on_loads` (None while the store is down).
    - publish: claims queued by `claim()` (the request path only appends to a bounded
      queue) go out in one pub/sub message per batch.
    - subscribe: other replicas' claims go to `on_claim`, which returns False for an engine
      this replica does not know (dropped, counted).

    Nothing raises out of a loop: every store error is counted in `errors` (by op: sync,
    publish, subscribe), the loop retries after a jittered exponential backoff in
    `backoff_s` (capped at 2 s), and routing keeps its local state. The sync loop is the
    heartbeat: its first failure logs one warning, its first success after an outage one info.
    """

    def __init__(
        self,
        url: str,
        *,
        loads: Callable[[], Loads],
        on_loads: Callable[[Loads | None], None],
        on_claim: Callable[[SpeculativeClaim], bool],
        interval_s: float,
        ttl_s: float,
        key_prefix: str,
        backoff_s: tuple[float, float],
        replica_id: str | None = None,
    ) -> None:
        self.url = url
        self.replica_id = replica_id or (
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        )
        self._loads = loads
        self._on_loads = on_loads
        self._on_claim = on_claim
        self._interval_s = interval_s
        self._ttl_ms = max(1, round(ttl_s * 1000))
        # A reconnect attempt costs one refused connection: past _MAX_BACKOFF_S, waiting
        # longer only prolongs the outage after the store is back.
        self._backoff_s = (backoff_s[0], max(backoff_s[0], min(backoff_s[1], _MAX_BACKOFF_S)))
        self._replicas_key = f"{key_prefix}:replicas"
        self._key_prefix = f"{key_prefix}:load:"
        self._channel = f"{key_prefix}:speculative"
        # Generous against a busy store or host (a timeout counts as an outage), short enough
        # that a hung store holds the loops back for well under the TTL.
        timeout = max(0.5, min(2.0, interval_s * 4))
        self._redis = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # the loops below retry, with backoff
            health_check_interval=0,
        )
        self._rng = random.Random()
        self._pending: collections.deque[SpeculativeClaim] = collections.deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._encoder = msgspec.msgpack.Encoder()
        self._claims_decoder = msgspec.msgpack.Decoder(_Claims)
        self._loads_decoder = msgspec.msgpack.Decoder(_Loads)
        self._outage_logged = False
        # Read by the metrics at scrape time (metrics.watch_shared_state).
        self.up = False
        self.subscribed = False  # listening for the other replicas' claims right now
        self.peers = 0  # other replicas whose keys the last sync read
        self.errors: collections.Counter[str] = collections.Counter()  # op -> failures
        self.dropped: collections.Counter[str] = collections.Counter()  # reason -> claims
        self.claims: collections.Counter[str] = collections.Counter()  # sent / received

    # ---- the request path ------------------------------------------------------------------

    def claim(self, claim: SpeculativeClaim) -> None:
        """Queue `claim` for the other replicas; never blocks, never raises."""
        if not self.up:
            self.dropped["store_down"] += 1
            return
        if len(self._pending) >= _MAX_PENDING:
            self.dropped["backlog"] += 1
            return
        self._pending.append(claim)
        self._wake.set()

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._sync_loop(), name="kvroute-shared-sync"),
            asyncio.create_task(self._publish_loop(), name="kvroute-shared-publish"),
            asyncio.create_task(self._subscribe_loop(), name="kvroute-shared-subscribe"),
        ]

    async def close(self) -> None:
        self._closing = True
        pending = set(self._tasks)
        self._tasks = []
        while pending:
            # A cancellation can be lost inside the client (a socket timeout expiring at the
            # same moment turns it into TimeoutError): ask again; the loops also end on
            # `_closing` at their next turn.
            for task in pending:
                task.cancel()
            _done, pending = await asyncio.wait(pending, timeout=0.5)
        if self.up:  # leave at once instead of after the TTL; best effort
            with contextlib.suppress(*_STORE_ERRORS):
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.delete(self._key(self.replica_id))
                    pipe.zrem(self._replicas_key, self.replica_id)
                    await pipe.execute()
        self.up = False
        with contextlib.suppress(*_STORE_ERRORS):
            await self._redis.aclose()

    # ---- the loops -------------------------------------------------------------------------

    def _key(self, replica: str) -> str:
        return f"{self._key_prefix}{replica}"

    def _delay(self, failures: int) -> float:
        low, high = self._backoff_s
        delay: float = min(high, low * 2 ** (failures - 1)) * self._rng.uniform(0.5, 1.0)
        return delay

    async def _sync_loop(self) -> None:
        failures = 0
        while not self._closing:
            try:
                await self._sync()
            except Exception as exc:
                if not isinstance(exc, _STORE_ERRORS):
                    log.exception("shared state: sync failed")
                failures += 1
                self.errors["sync"] += 1
                self._down(exc)
                await asyncio.sleep(self._delay(failures))
                continue
            failures = 0
            self._back()
            await asyncio.sleep(self._interval_s)

    async def _sync(self) -> None:
        """Write this replica's counts, then read and sum the other replicas'."""
        now = time.time()
        own = self._encoder.encode(_Loads(dict(self._loads())))
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._key(self.replica_id), own, px=self._ttl_ms)
            pipe.zadd(self._replicas_key, {self.replica_id: now})
            pipe.zremrangebyscore(self._replicas_key, "-inf", now - _FORGET_S)
            pipe.zrange(self._replicas_key, 0, -1)
            replies: list[Any] = await pipe.execute()
        others = [_text(m) for m in replies[3]]
        others = [r for r in others if r != self.replica_id]
        values: list[bytes | str | None] = (
            list(await self._redis.mget([self._key(r) for r in others])) if others else []
        )
        sums: dict[str, tuple[int, int]] = {}
        peers = 0
        for raw in values:
            if raw is None:
                continue  # expired: that replica stopped publishing, its counts are gone
            if isinstance(raw, str):  # only with decode_responses, which this client never sets
                raw = raw.encode()
            try:
                loads = self._loads_decoder.decode(raw)
            except msgspec.DecodeError:
                self.dropped["malformed"] += 1
                continue
            peers += 1
            for engine, (requests, tokens) in loads.engines.items():
                old_requests, old_tokens = sums.get(engine, (0, 0))
                sums[engine] = (old_requests + max(0, requests), old_tokens + max(0, tokens))
        self.peers = peers
        self._on_loads(sums)

    async def _publish_loop(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            batch = list(self._pending)
            self._pending.clear()
            if not batch:
                continue
            message = _Claims(
                self.replica_id,
                [(c.engine, c.model, c.lora, c.cache_salt, c.token_ids) for c in batch],
            )
            try:
                await self._redis.publish(self._channel, self._encoder.encode(message))
            except Exception as exc:
                if not isinstance(exc, _STORE_ERRORS):
                    log.exception("shared state: publish failed")
                self.errors["publish"] += 1
                self.dropped["store_down"] += len(batch)
                log.debug("shared state: publish failed: %s: %s", type(exc).__name__, exc)
                continue
            self.claims["sent"] += len(batch)

    async def _subscribe_loop(self) -> None:
        failures = 0
        while not self._closing:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                while not self._closing:
                    message = await pubsub.get_message(timeout=_GET_TIMEOUT_S)
                    if message is None:
                        continue
                    if message.get("type") == "message":
                        self._received(message["data"])
                    elif message.get("type") == "subscribe":  # the server's confirmation
                        self.subscribed = True
                        failures = 0
            except Exception as exc:
                if not isinstance(exc, _STORE_ERRORS):
                    log.exception("shared state: subscription failed")
                failures += 1
                self.errors["subscribe"] += 1
                log.debug("shared state: subscription failed: %s: %s", type(exc).__name__, exc)
            finally:
                self.subscribed = False
                with contextlib.suppress(*_STORE_ERRORS):
                    await pubsub.aclose()
            await asyncio.sleep(self._delay(max(1, failures)))

    def _received(self, data: bytes) -> None:
        try:
            message = self._claims_decoder.decode(data)
        except msgspec.DecodeError:
            self.dropped["malformed"] += 1
            return
        if message.replica == self.replica_id:
            return  # our own, already in our index
        for engine, model, lora, salt, token_ids in message.claims:
            self.claims["received"] += 1
            try:
                applied = self._on_claim(SpeculativeClaim(engine, model, lora, token_ids, salt))
            except Exception:  # a bug behind the callback must not end the subscription
                log.exception("shared state: applying a claim failed")
                self.dropped["error"] += 1
                continue
            if not applied:
                self.dropped["unknown_engine"] += 1

    # ---- outage bookkeeping ----------------------------------------------------------------

    def _down(self, exc: BaseException) -> None:
        self.up = False
        self.peers = 0
        self._on_loads(None)
        if not self._outage_logged:
            self._outage_logged = True
            log.warning(
                "shared state store %s unreachable (%s: %s); routing goes on with this "
                "replica's own load until it is back",
                _redacted(self.url),
                type(exc).__name__,
                exc,
            )

    def _back(self) -> None:
        if not self.up and self._outage_logged:
            log.info("shared state store %s reachable again", _redacted(self.url))
        self._outage_logged = False
        self.up = True


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _redacted(url: str) -> str:
    """`url` without a password (redis://user:secret@host → redis://user:***@host)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user, has_password, _password = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if has_password else ''}@{host}"
