"""A fleet of simulated engines in one process: HTTP servers, event publishers per DP rank, the
fleet file with the real ports, and process-level faults (restart, kill)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import uvicorn
import yaml

from kvroute.events.publisher import ZmqEventPublisher
from kvroute.sim.engine import SimConfig, SimEngine
from kvroute.sim.server import create_engine_app
from kvroute.sim.tokenizer import SimTokenizer

__all__ = ["PORT_STRIDE", "SimFleet"]

PORT_STRIDE = 10
"""Engine i, DP rank r listens on base + i·PORT_STRIDE + r (HTTP: base + i·PORT_STRIDE)."""


class _Server(uvicorn.Server):
    """uvicorn without signal capture (the process owns its signals) and with a ready event."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


def _listen_socket(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections whose socket says TCP
    # (its _set_nodelay checks proto), as on those of create_server(host, port), which vLLM's
    # uvicorn uses. With proto 0 Nagle stayed on: a request right after another on the same
    # connection waited ~40 ms for a delayed ACK (docs/design.md, "The router's own latency").
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


_PICK = random.SystemRandom()  # not the global generator, which a test may have seeded


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out for outgoing connections and `bind(0)`."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _consecutive_free_ports(host: str, n: int, attempts: int = 50, avoid: range = range(0)) -> int:
    """A base port P with P..P+n-1 all free right now and none in `avoid` (ports picked for
    another socket that is not bound yet; vLLM offsets DP ranks by +rank).

    The ports are bound later, by the engine's publisher: they are picked *below* the
    ephemeral range, where no outgoing connection or `bind(0)` of another process can take them
    meanwhile (a CI run failed on exactly that: EADDRINUSE after the bind retries)."""
    low, _high = _ephemeral_range()
    floor = 10_000 if low > 12_000 else 1_024
    for _ in range(attempts):
        held: list[socket.socket] = []
        try:
            base = _PICK.randrange(floor, max(floor + 1, low - n))
            if base + n - 1 > 65535 or any(base + k in avoid for k in range(n)):
                continue
            for k in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(s)
                s.bind((host, base + k))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise OSError(f"no {n} consecutive free TCP ports on {host} after {attempts} attempts")


class _Member:
    """One engine of the fleet with its HTTP server."""

    def __init__(self, engine: SimEngine, http_port: int) -> None:
        self.engine = engine
        self.http_port = http_port
        self.server: _Server | None = None
        self.task: asyncio.Task[None] | None = None
        self.sock: socket.socket | None = None


class SimFleet:
    """`n_engines` simulated engines of one model on `host`, each with `dp_ranks` DP ranks.

    Ports: with a base of 0 the system picks free ports (consecutive per engine for the
    event and replay sockets, since consumers add the rank); otherwise engine i rank r uses
    base + i·PORT_STRIDE + r. `engines[i].url` and `.events_endpoints` are set after start().
    """

    def __init__(
        self,
        n_engines: int,
        model: str,
        *,
        dp_ranks: int = 1,
        config: SimConfig | None = None,
        lora: Sequence[str] = (),
        host: str = "127.0.0.1",
        http_base_port: int = 0,
        events_base_port: int = 0,
        replay_base_port: int = 0,
        name_prefix: str = "engine-",
    ) -> None:
        if n_engines < 1:
            raise ValueError(f"n_engines: expected >= 1, got {n_engines}")
        if not 1 <= dp_ranks <= PORT_STRIDE:
            raise ValueError(f"dp_ranks: expected 1..{PORT_STRIDE}, got {dp_ranks}")
        self.model = model
        self.config = config if config is not None else SimConfig()
        self.dp_ranks = dp_ranks
        self.lora = tuple(lora)
        self.host = host
        self._http_base = http_base_port
        self._events_base = events_base_port
        self._replay_base = replay_base_port
        self.tokenizer = SimTokenizer(self.config.vocab_size)
        self._members: list[_Member] = []
        self._names = [f"{name_prefix}{i}" for i in range(n_engines)]
        self.engines: list[SimEngine] = []
        self._started = False

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind every publisher and HTTP server; returns when all are serving."""
        if self._started:
            return
        self._started = True
        try:
            for i, name in enumerate(self._names):
                member = self._build(i, name)
                self._members.append(member)
                self.engines.append(member.engine)
                await member.engine.start()
                await self._serve_http(member)
        except BaseException:
            await self.close()
            raise

    def _endpoint_base(self, base: int, i: int, avoid: range = range(0)) -> int:
        if base:
            return base + i * PORT_STRIDE
        return _consecutive_free_ports(self.host, self.dp_ranks, avoid=avoid)

    def _build(self, i: int, name: str) -> _Member:
        cfg = self.config
        events = self._endpoint_base(self._events_base, i)
        # Both are picked before either is bound: the replay ports must not be the event ports
        # (a bench run failed on that, EADDRINUSE on the second bind).
        replay = (
            self._endpoint_base(self._replay_base, i, avoid=range(events, events + self.dp_ranks))
            if cfg.replay
            else None
        )
        publishers = [
            ZmqEventPublisher(
                f"tcp://{self.host}:{events + r}",
                replay_endpoint=None if replay is None else f"tcp://{self.host}:{replay + r}",
                topic=cfg.topic,
                release=cfg.release,
                buffer_steps=cfg.buffer_steps,
                curve=cfg.curve,
            )
            for r in range(self.dp_ranks)
        ]
        engine = SimEngine(
            name,
            self.model,
            config=cfg,
            tokenizer=self.tokenizer,
            publishers=publishers,
            lora=self.lora,
        )
        http = self._http_base + i * PORT_STRIDE if self._http_base else 0
        return _Member(engine, http)

    async def _serve_http(self, member: _Member) -> None:
        sock = _listen_socket(self.host, member.http_port)
        member.http_port = int(sock.getsockname()[1])
        member.sock = sock
        config = uvicorn.Config(
            create_engine_app(member.engine),
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        server = _Server(config)
        member.server = server
        member.task = asyncio.create_task(server.serve(sockets=[sock]), name=member.engine.name)
        ready = asyncio.create_task(server.ready.wait())
        await asyncio.wait({ready, member.task}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            member.task.result()  # raises the startup error
            raise OSError(f"{member.engine.name}: HTTP server stopped during start-up")
        member.engine.url = f"http://{self.host}:{member.http_port}"

    async def _stop_http(self, member: _Member) -> None:
        server, task = member.server, member.task
        member.server = member.task = None
        if server is not None:
            server.should_exit = True
        if task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        if member.sock is not None:
            member.sock.close()
            member.sock = None

    async def close(self) -> None:
        """Stop every HTTP server, step loop and publisher."""
        for member in self._members:
            await member.engine.close()  # fails in-flight requests, so streams end
        await asyncio.gather(*(self._stop_http(m) for m in self._members))
        self._members = []

    async def __aenter__(self) -> SimFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- access and faults ---------------------------------------------------------------------
    def engine(self, name: str) -> SimEngine:
        for e in self.engines:
            if e.name == name:
                return e
        raise KeyError(f"no simulated engine named {name!r}")

    async def restart_engine(self, name: str) -> None:
        """Process-restart semantics: pools emptied, in-flight requests fail, seq back to 0 on
        every rank, no AllBlocksCleared; HTTP keeps its port."""
        await self.engine(name).restart()

    async def kill_engine(self, name: str) -> None:
        """Stop serving HTTP and events entirely (connections are refused afterwards)."""
        engine = self.engine(name)
        for member in self._members:
            if member.engine is engine:
                await engine.close()
                await self._stop_http(member)

    # -- fleet file ----------------------------------------------------------------------------
    def fleet_entries(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for e in self.engines:
            entry: dict[str, object] = {
                "name": e.name,
                "model": e.model,
                "url": e.url,
                "events": e.events_endpoints[0],
            }
            replay = e.replay_endpoints[0]
            if replay is not None:
                entry["replay"] = replay
            if self.config.topic:
                entry["topic"] = self.config.topic
            entry["dp_ranks"] = list(e.ranks)
            if e.lora:
                entry["lora"] = list(e.lora)
            if self.config.curve is not None:
                entry["curve_server_key"] = self.config.curve.public.decode()
            out.append(entry)
        return out

    def fleet_yaml(self) -> str:
        """The fleet file (docs/architecture.md, "Fleet file") with the real ports."""
        return yaml.safe_dump({"engines": self.fleet_entries()}, sort_keys=False)

    def write_fleet_file(self, path: Path) -> None:
        """Write the fleet file atomically (a watcher never sees half a file)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.fleet_yaml())
        tmp.replace(path)
