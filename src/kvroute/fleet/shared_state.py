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
    """One replica's (requests, tokens) in flight per engine: its key's value, and the message
    it publishes on every change. `seq` grows with every version, so an older one (a key read
    after a newer message arrived) never overwrites a newer one."""

    replica: str
    seq: int
    engines: dict[str, tuple[int, int]]


class SharedState:
    """This replica's side of the shared store. `start()` launches three loops, `close()`
    stops them and deletes this replica's key.

    - publish: after `loads_changed()` (called on every change of this replica's in-flight
      counts) the counts (`loads()`) go out on the load channel, one message for all the
      changes since the last; claims queued by `claim()` go out in one message per batch.
      The request path only sets a flag or appends to a bounded queue.
    - subscribe: other replicas' counts update the per-engine sums handed to `on_loads` as
      they arrive; their claims go to `on_claim`, which returns False for an engine this
      replica does not know (dropped, counted).
    - sync, every `interval_s` (the heartbeat and the repair of lost messages): write this
      replica's counts under its own key with a `ttl_s` expiry, then read every other live
      replica's key; a replica whose key expired stops counting. `on_loads` gets None while
      the store is down.

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
        self._load_channel = f"{key_prefix}:loads"
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
        self._loads_dirty = False
        self._seq = 0  # of this replica's last encoded counts
        self._peers: dict[str, _Loads] = {}  # the other replicas' latest counts
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._encoder = msgspec.msgpack.Encoder()
        self._claims_decoder = msgspec.msgpack.Decoder(_Claims)
        self._loads_decoder = msgspec.msgpack.Decoder(_Loads)
        self._channels: dict[bytes, Callable[[bytes], None]] = {
            self._channel.encode(): self._received,
            self._load_channel.encode(): self._received_loads,
        }
        self._outage_logged = False
        # Read by the metrics at scrape time (metrics.watch_shared_state).
        self.up = False
        self.subscribed = False  # listening for the other replicas' claims right now
        self.peers = 0  # other replicas whose keys the last sync read
        self.errors: collections.Counter[str] = collections.Counter()  # op -> failures
        self.dropped: collections.Counter[str] = collections.Counter()  # reason -> claims
        self.claims: collections.Counter[str] = collections.Counter()  # sent / received
        self.load_updates: collections.Counter[str] = collections.Counter()  # sent / received

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

    def loads_changed(self) -> None:
        """This replica's in-flight counts changed: publish them soon; never blocks."""
        if self.up:
            self._loads_dirty = True
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

    def _own_loads(self) -> bytes:
        self._seq += 1
        return self._encoder.encode(_Loads(self.replica_id, self._seq, dict(self._loads())))

    async def _sync(self) -> None:
        """Write this replica's counts, then read the other replicas' and sum them."""
        now = time.time()
        own = self._own_loads()
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
        peers: dict[str, _Loads] = {}
        for replica, raw in zip(others, values, strict=True):
            if raw is None:
                continue  # expired: that replica stopped publishing, its counts are gone
            if isinstance(raw, str):  # only with decode_responses, which this client never sets
                raw = raw.encode()
            try:
                loads = self._loads_decoder.decode(raw)
            except msgspec.DecodeError:
                self.dropped["malformed"] += 1
                continue
            newer = self._peers.get(replica)  # a message that arrived after the key was read
            peers[replica] = newer if newer is not None and newer.seq > loads.seq else loads
        self._peers = peers
        self._publish_sums()

    def _publish_sums(self) -> None:
        sums: dict[str, tuple[int, int]] = {}
        for loads in self._peers.values():
            for engine, (requests, tokens) in loads.engines.items():
                old_requests, old_tokens = sums.get(engine, (0, 0))
                sums[engine] = (old_requests + max(0, requests), old_tokens + max(0, tokens))
        self.peers = len(self._peers)
        self._on_loads(sums)

    async def _publish_loop(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            if self._loads_dirty:
                # Every change since the last message goes out in this one.
                self._loads_dirty = False
                try:
                    await self._redis.publish(self._load_channel, self._own_loads())
                except Exception as exc:
                    if not isinstance(exc, _STORE_ERRORS):
                        log.exception("shared state: publish failed")
                    self.errors["publish"] += 1  # the next sync carries the counts
                    log.debug("shared state: publish failed: %s: %s", type(exc).__name__, exc)
                else:
                    self.load_updates["sent"] += 1
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
                await pubsub.subscribe(*self._channels)
                while not self._closing:
                    message = await pubsub.get_message(timeout=_GET_TIMEOUT_S)
                    if message is None:
                        continue
                    if message.get("type") == "message":
                        handler = self._channels.get(_bytes(message["channel"]))
                        if handler is not None:
                            handler(message["data"])
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

    def _received_loads(self, data: bytes) -> None:
        try:
            loads = self._loads_decoder.decode(data)
        except msgspec.DecodeError:
            self.dropped["malformed"] += 1
            return
        if loads.replica == self.replica_id or not self.up:
            return  # our own; or the store is down and the others' counts are not used
        known = self._peers.get(loads.replica)
        if known is not None and known.seq >= loads.seq:
            return  # older than what the last sync read
        self.load_updates["received"] += 1
        self._peers[loads.replica] = loads
        self._publish_sums()

    # ---- outage bookkeeping ----------------------------------------------------------------

    def _down(self, exc: BaseException) -> None:
        self.up = False
        self.peers = 0
        self._peers = {}
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


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _redacted(url: str) -> str:
    """`url` without a password (redis://user:secret@host → redis://user:***@host)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user, has_password, _password = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if has_password else ''}@{host}"
