"""`Relay`: one engine's PUB and replay ROUTER (plain, loopback) republished as CURVE servers
that only allow-listed gateways may use; seqs, payloads and replay frames pass unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils.monitor import parse_monitor_message

from kvroute.errors import ConfigError
from kvroute.events.curve import CurveKeyPair, curve_server
from kvroute.relay.allow_list import AllowList
from kvroute.relay.counters import RelayCounters
from kvroute.relay.forward import LiveForwarder
from kvroute.relay.handshakes import HANDSHAKE_EVENTS, watch_handshakes
from kvroute.relay.replay_proxy import ReplayProxy

__all__ = ["Relay", "RelayConfig"]

log = logging.getLogger("kvroute.relay")

_MAX_REQUEST_BYTES: Final = 1024  # what a client may send: subscriptions, 8-byte replay requests


@dataclass(frozen=True)
class RelayConfig:
    """Where the engine publishes (connect, plain), where the relay binds (CURVE server), its key
    pair and the directory of allowed gateway public keys."""

    engine_events: str
    bind_events: str
    keys: CurveKeyPair
    allow_dir: Path
    engine_replay: str | None = None
    bind_replay: str | None = None
    max_replays: int = 16
    replay_timeout_s: float = 30.0
    hwm: int = 100_000
    allow_reload_s: float = 2.0

    def __post_init__(self) -> None:
        if (self.engine_replay is None) != (self.bind_replay is None):
            raise ConfigError("relay: engine replay and bind replay: expected both or neither")
        if self.max_replays < 1:
            raise ConfigError(f"relay: max replays: expected >= 1, got {self.max_replays}")
        if self.replay_timeout_s <= 0 or self.allow_reload_s <= 0:
            raise ConfigError("relay: replay timeout and allow-list reload: expected > 0 s")


class Relay:
    """Runs on the asyncio loop (ZAP included: zmq.auth's AsyncioAuthenticator, no thread).

    `start()` binds; `events_endpoint` and `replay_endpoint` are then the connect addresses
    (tcp://*:P → tcp://127.0.0.1:P). `counters` says what passed and who was refused.

    The relay's PUB mirrors the engine's connection: when the engine's PUB goes away (a
    restart), the relay closes its own, so gateways see the disconnect they would see directly
    (and bootstrap by replay when it is back); it is rebound on the same port once the engine
    is reachable again.
    """

    def __init__(self, config: RelayConfig, *, context: zmq.asyncio.Context | None = None) -> None:
        self.config = config
        self.counters = RelayCounters()
        self.allow_list = AllowList(config.allow_dir, self.counters)
        # The ZAP handler answers for every socket of its context: the relay owns one.
        self._context = zmq.asyncio.Context() if context is None else context
        self._own_context = context is None
        self._auth: AsyncioAuthenticator | None = None
        self._sockets: list[zmq.Socket[Any]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.events_endpoint = ""
        self.replay_endpoint: str | None = None
        self.replay_proxy: ReplayProxy | None = None
        self._forwarder: LiveForwarder | None = None
        self._pub: zmq.asyncio.Socket | None = None
        self._pub_monitor: zmq.asyncio.Socket | None = None
        self._pub_watch: asyncio.Task[None] | None = None
        self._pub_address = config.bind_events  # pinned to the port it got on the first bind
        self.engine_connected = False  # the engine's PUB is connected (its handshake done)
        self._closed = False

    async def start(self) -> None:
        """Start ZAP first (a CURVE server without a ZAP handler lets any client key in), then
        connect to the engine and bind; ConfigError when an endpoint is unusable."""
        cfg = self.config
        auth = AsyncioAuthenticator(self._context, log=logging.getLogger("kvroute.relay.zap"))
        auth.start()
        auth.configure_curve_callback("*", credentials_provider=self.allow_list)
        self._auth = auth
        try:
            sub = self._socket(zmq.SUB)
            sub.setsockopt(zmq.RCVHWM, cfg.hwm)
            sub.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            sub.setsockopt(zmq.SUBSCRIBE, b"")  # everything: each gateway's topic is its own
            engine_monitor = sub.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
            )
            self._sockets.append(engine_monitor)
            self._forwarder = LiveForwarder(sub, self.counters)
            await self._open_pub()
            self._connect(sub, cfg.engine_events, "engine events")
            self._spawn(self._forwarder.run(), "forward")
            self._spawn(self._watch_engine(engine_monitor), "engine-monitor")
            if cfg.engine_replay is not None and cfg.bind_replay is not None:
                router = self._socket(zmq.ROUTER)
                router.setsockopt(zmq.ROUTER_MANDATORY, 1)
                router.setsockopt(zmq.SNDHWM, cfg.hwm)
                self.replay_endpoint = self._bind(router, cfg.bind_replay, "bind replay")
                self.replay_proxy = ReplayProxy(
                    self._context,
                    router,
                    cfg.engine_replay,
                    self.counters,
                    max_outstanding=cfg.max_replays,
                    timeout_s=cfg.replay_timeout_s,
                )
                self._spawn(self.replay_proxy.run(), "replay")
                self._spawn(self._watch(router, "replay"), "replay-handshakes")
            self._spawn(self._reload_allow_list(), "allow-list")
        except BaseException:
            await self.close()
            raise
        log.info(
            "relay started",
            extra={
                "engine_events": cfg.engine_events,
                "engine_replay": cfg.engine_replay,
                "events": self.events_endpoint,
                "replay": self.replay_endpoint,
                "server_key": cfg.keys.public.decode(),
                "allowed_keys": len(self.allow_list.keys),
            },
        )

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        self._sockets.append(sock)
        return sock

    def _connect(self, sock: zmq.Socket[Any], endpoint: str, what: str) -> None:
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise ConfigError(f"relay: {what}: cannot connect to {endpoint!r} ({exc})") from exc

    def _bind(self, sock: zmq.Socket[Any], endpoint: str, what: str) -> str:
        """CURVE server, small inbound messages, then bind: the address to connect to."""
        curve_server(sock, self.config.keys)
        sock.setsockopt(zmq.MAXMSGSIZE, _MAX_REQUEST_BYTES)
        sock.setsockopt(zmq.IPV6, int(endpoint.startswith("tcp://[")))
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise ConfigError(f"relay: {what}: cannot bind {endpoint!r} ({exc})") from exc
        bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        for wildcard, local in (("//0.0.0.0:", "//127.0.0.1:"), ("//[::]:", "//[::1]:")):
            bound = bound.replace(wildcard, local)
        return bound

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=f"kvroute-relay-{name}"))

    async def _watch(self, sock: zmq.asyncio.Socket, name: str) -> None:
        monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
        self._sockets.append(monitor)
        await watch_handshakes(monitor, name, self.counters)

    async def _open_pub(self) -> None:
        """Bind the CURVE PUB (retrying briefly while the old one's port is still held)."""
        assert self._forwarder is not None
        pub = self._context.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.set_hwm(self.config.hwm)
        loop = asyncio.get_running_loop()
        until = loop.time() + 5.0
        while True:
            try:
                self.events_endpoint = self._bind(pub, self._pub_address, "bind events")
                break
            except ConfigError as exc:
                retry = isinstance(exc.__cause__, zmq.ZMQError) and (
                    exc.__cause__.errno == zmq.EADDRINUSE
                )
                if not retry or loop.time() > until or self._pub_address == self.config.bind_events:
                    pub.close(linger=0)
                    raise
                await asyncio.sleep(0.05)  # a bind retry, not a synchronisation
        self._pub_address = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._pub = pub
        self._pub_monitor = pub.get_monitor_socket(HANDSHAKE_EVENTS)
        self._pub_watch = asyncio.create_task(
            watch_handshakes(self._pub_monitor, "events", self.counters),
            name="kvroute-relay-events-handshakes",
        )
        # A plain view of the PUB: sends never block (PUB drops at its HWM, like vLLM's).
        self._forwarder.pub = zmq.Socket.shadow(pub.underlying)

    async def _close_pub(self) -> None:
        if self._forwarder is not None:
            self._forwarder.pub = None
        task, self._pub_watch = self._pub_watch, None
        if task is not None:
            task.cancel()
            # wait(), not `await task`: a cancellation of the caller itself must not be lost.
            await asyncio.wait([task])
        pub, monitor = self._pub, self._pub_monitor
        self._pub = self._pub_monitor = None
        if pub is not None:
            with contextlib.suppress(zmq.ZMQError):
                pub.disable_monitor()
            pub.close(linger=0)
        if monitor is not None:
            monitor.close(linger=0)

    async def _watch_engine(self, monitor: zmq.asyncio.Socket) -> None:
        """Mirror the engine's connection on the relay's PUB (see the class docstring)."""
        where = {"engine": self.config.engine_events}
        while True:
            message = parse_monitor_message(await monitor.recv_multipart())
            self.engine_connected = message["event"] != zmq.EVENT_DISCONNECTED
            if message["event"] == zmq.EVENT_DISCONNECTED:
                self.counters.engine_disconnects += 1
                log.warning("relay: engine events disconnected; PUB closed", extra=where)
                await self._close_pub()
            else:
                log.info("relay: engine events connected", extra=where)
                while self._pub is None:
                    try:
                        await self._open_pub()
                    except ConfigError as exc:  # the port was taken meanwhile: keep trying
                        log.error(
                            "relay: cannot rebind events; retrying", extra={"error": str(exc)}
                        )
                        await asyncio.sleep(1.0)  # a retry backoff, not a synchronisation

    async def _reload_allow_list(self) -> None:
        while True:
            await asyncio.sleep(self.config.allow_reload_s)
            self.allow_list.reload_if_changed()

    async def close(self) -> None:
        """Stop every task, close every socket (linger 0), stop ZAP; never hangs."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        self._tasks.clear()
        await self._close_pub()
        for sock in reversed(self._sockets):
            with contextlib.suppress(zmq.ZMQError):
                sock.close(linger=0)
        self._sockets.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_context:
            self._context.term()

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
