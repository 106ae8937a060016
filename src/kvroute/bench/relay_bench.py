"""`kvroute bench relay`: publish→received latency (p50/p99) and throughput of KV-event
messages direct vs through `kvroute relay` (CURVE, its own process), in the same run."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import statistics
import tempfile
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

import zmq

from kvroute.bench.report import DEFAULT_OUT_DIR, bar_chart, print_table, save_json, stop_child
from kvroute.events import (
    CurveClientKeys,
    VllmBlockStored,
    VllmEventBatch,
    curve_client,
    encode_batch,
    load_curve_key_pair,
    write_curve_key_pair,
)
from kvroute.relay import Relay, RelayConfig

__all__ = ["run"]

# size -> (one-in-flight samples, paced messages, paced rate msg/s, burst messages)
_SIZES: Final = {
    "smoke": (2_000, 5_000, 5_000.0, 50_000),
    "full": (20_000, 50_000, 5_000.0, 500_000),
}
_BLOCKS: Final = 16  # blocks per BlockStored: one prompt's worth of a scheduler step
_BLOCK_SIZE: Final = 16
_TOPIC: Final = b"kv"
_HWM: Final = 1_000_000
_DEADLINE_S: Final = 60.0


def _payload() -> bytes:
    stored = VllmBlockStored(
        block_hashes=list(range(1 << 40, (1 << 40) + _BLOCKS)),
        parent_block_hash=None,
        token_ids=list(range(_BLOCKS * _BLOCK_SIZE)),
        block_size=_BLOCK_SIZE,
        medium="GPU",
        group_idx=0,
    )
    return encode_batch(VllmEventBatch(1700000000.5, [stored], 0), "0.33.0")


def _relay_child(config: RelayConfig, conn: Connection) -> None:
    """The relay in a process of its own, as a sidecar runs: reports its endpoint, then serves
    until told to stop."""

    async def serve() -> None:
        relay = Relay(config)
        await relay.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _DEADLINE_S
        while not relay.engine_connected and loop.time() < deadline:
            await asyncio.sleep(0.01)
        conn.send(relay.events_endpoint)
        stop = asyncio.Event()
        loop.add_reader(conn.fileno(), stop.set)
        await stop.wait()
        loop.remove_reader(conn.fileno())
        conn.send(relay.counters.forwarded_messages)
        await relay.close()

    asyncio.run(serve())


class _Sides:
    """The publisher (the engine) and two subscribers: one direct, one through the relay."""

    def __init__(self, ctx: zmq.Context[Any], relay_endpoint: str, pub: zmq.Socket[Any],
                 keys: CurveClientKeys) -> None:  # fmt: skip
        self.pub = pub
        self.direct = ctx.socket(zmq.SUB)
        self.relayed = ctx.socket(zmq.SUB)
        curve_client(self.relayed, keys)
        for sock, endpoint in (
            (self.direct, pub.getsockopt_string(zmq.LAST_ENDPOINT)),
            (self.relayed, relay_endpoint),
        ):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, _HWM)
            sock.setsockopt(zmq.SUBSCRIBE, _TOPIC)
            sock.connect(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.direct, zmq.POLLIN)
        self.poller.register(self.relayed, zmq.POLLIN)
        self.seq = 0

    def send(self, payload: bytes) -> int:
        seq = self.seq
        self.seq += 1
        self.pub.send_multipart([_TOPIC, seq.to_bytes(8, "big"), payload])
        return seq

    def drain(self, timeout_ms: int, seen: tuple[dict[int, float], dict[int, float]]) -> None:
        """Wait up to `timeout_ms` for either socket, then take everything queued on both,
        stamping each message's seq with its arrival time."""
        ready = dict(self.poller.poll(timeout_ms))
        now = time.perf_counter()
        for sock, record in ((self.direct, seen[0]), (self.relayed, seen[1])):
            if sock not in ready:
                continue
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                record[int.from_bytes(frames[1], "big")] = now

    def close(self) -> None:
        self.poller = zmq.Poller()
        self.direct.close(linger=0)
        self.relayed.close(linger=0)


def _percentiles(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return q[49], q[98]


def _warm_up(sides: _Sides, payload: bytes) -> None:
    """Publish until both subscribers receive (slow joiners and the relay's connections)."""
    deadline = time.perf_counter() + _DEADLINE_S
    while True:
        seen: tuple[dict[int, float], dict[int, float]] = ({}, {})
        seq = sides.send(payload)
        end = time.perf_counter() + 0.2
        while time.perf_counter() < end and not (seq in seen[0] and seq in seen[1]):
            sides.drain(20, seen)
        if seq in seen[0] and seq in seen[1]:
            return
        if time.perf_counter() > deadline:
            raise RuntimeError("relay bench: the subscribers never received a message")


def _one_in_flight(sides: _Sides, payload: bytes, n: int) -> tuple[list[float], list[float]]:
    """Send one message, wait for both copies, repeat: unloaded latency (µs) of each path."""
    direct: list[float] = []
    relayed: list[float] = []
    for _ in range(n):
        seen: tuple[dict[int, float], dict[int, float]] = ({}, {})
        t0 = time.perf_counter()
        seq = sides.send(payload)
        while not (seq in seen[0] and seq in seen[1]):
            if time.perf_counter() - t0 > 5:
                raise RuntimeError(f"relay bench: message {seq} lost")
            sides.drain(100, seen)
        direct.append((seen[0][seq] - t0) * 1e6)
        relayed.append((seen[1][seq] - t0) * 1e6)
    return direct, relayed


def _paced(
    sides: _Sides, payload: bytes, n: int, rate: float
) -> tuple[list[float], list[float], int, int]:
    """Send `n` messages at `rate` per second while receiving: latency (µs) under load, and how
    many of them each path delivered."""
    sent: dict[int, float] = {}
    seen: tuple[dict[int, float], dict[int, float]] = ({}, {})
    interval = 1.0 / rate
    start = time.perf_counter()
    first = sides.seq
    for i in range(n):
        due = start + i * interval
        while (now := time.perf_counter()) < due:
            sides.drain(max(0, int((due - now) * 1000)), seen)
        sent[sides.send(payload)] = time.perf_counter()
    end = time.perf_counter() + 5
    last = first + n - 1
    while not (last in seen[0] and last in seen[1]) and time.perf_counter() < end:
        sides.drain(50, seen)
    direct = [(seen[0][s] - t) * 1e6 for s, t in sent.items() if s in seen[0]]
    relayed = [(seen[1][s] - t) * 1e6 for s, t in sent.items() if s in seen[1]]
    return direct, relayed, len(direct), len(relayed)


def _receiver_child(endpoint: str, keys: CurveClientKeys | None, conn: Connection) -> None:
    """A subscriber in a process of its own: says "ready" at its first message, then, told
    (first seq, n), counts messages from that seq on and reports (count, seconds from the first
    to the last of them)."""
    ctx: zmq.Context[Any] = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, _HWM)
    sub.setsockopt(zmq.SUBSCRIBE, _TOPIC)
    if keys is not None:
        curve_client(sub, keys)
    sub.connect(endpoint)
    try:
        if not sub.poll(int(_DEADLINE_S * 1000)):
            conn.send("never received")
            return
        conn.send("ready")
        first, n = conn.recv()
        count, t_first, t_last = 0, 0.0, 0.0
        while count < n and sub.poll(5000):
            frames = sub.recv_multipart()
            if int.from_bytes(frames[1], "big") < first:
                continue
            t_last = time.perf_counter()
            if count == 0:
                t_first = t_last
            count += 1
        conn.send((count, t_last - t_first))
    finally:
        sub.close(linger=0)
        ctx.term()


def _burst(
    pub_send: Any, endpoint: str, keys: CurveClientKeys | None, payload: bytes, n: int
) -> tuple[float, int]:
    """Messages per second one subscriber (its own process) takes when `n` are published as
    fast as the PUB takes them, and how many it got."""
    spawn = multiprocessing.get_context("spawn")
    parent, child = spawn.Pipe()
    proc = spawn.Process(target=_receiver_child, args=(endpoint, keys, child), daemon=True)
    proc.start()
    try:
        deadline = time.perf_counter() + _DEADLINE_S
        while not parent.poll(0.05):  # publish until the receiver has joined (slow joiner)
            pub_send(payload)
            if time.perf_counter() > deadline:
                raise RuntimeError("relay bench: the burst receiver never joined")
        if parent.recv() != "ready":
            raise RuntimeError("relay bench: the burst receiver never received")
        first = pub_send(payload) + 1
        parent.send((first, n))
        for _ in range(n):
            pub_send(payload)
        if not parent.poll(_DEADLINE_S):
            raise RuntimeError("relay bench: the burst receiver did not report")
        count, seconds = parent.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
        parent.close()
    return (count / seconds if seconds > 0 else 0.0), count


def run(size: str = "smoke", out_dir: Path = DEFAULT_OUT_DIR) -> dict[str, Any]:
    """Measure, print a table, save bench-results/relay.json (+ a PNG); return the results."""
    if size not in _SIZES:
        raise ValueError(f"size: expected one of {sorted(_SIZES)}, got {size!r}")
    n_latency, n_paced, rate, n_burst = _SIZES[size]
    payload = _payload()
    ctx: zmq.Context[Any] = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, _HWM)
    pub.bind("tcp://127.0.0.1:*")
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        keys_dir, allow = Path(tmp) / "keys", Path(tmp) / "allow"
        allow.mkdir()
        _, relay_secret = write_curve_key_pair(keys_dir, "relay")
        gateway_public, gateway_secret = write_curve_key_pair(keys_dir, "gateway")
        (allow / "gateway.key").write_bytes(gateway_public.read_bytes())
        relay_keys = load_curve_key_pair(relay_secret)
        gateway_keys = load_curve_key_pair(gateway_secret)
        config = RelayConfig(
            engine_events=pub.getsockopt_string(zmq.LAST_ENDPOINT),
            bind_events="tcp://127.0.0.1:*",
            keys=relay_keys,
            allow_dir=allow,
            hwm=_HWM,
        )
        parent, child = spawn.Pipe()
        proc = spawn.Process(target=_relay_child, args=(replace(config), child), daemon=True)
        proc.start()
        sides: _Sides | None = None
        try:
            if not parent.poll(_DEADLINE_S):
                raise RuntimeError("relay bench: the relay did not start")
            endpoint = parent.recv()
            sides = _Sides(ctx, endpoint, pub, CurveClientKeys(gateway_keys, relay_keys.public))
            _warm_up(sides, payload)
            lat_d, lat_r = _one_in_flight(sides, payload, n_latency)
            paced_d, paced_r, got_d, got_r = _paced(sides, payload, n_paced, rate)
            sides.close()
            client_keys = CurveClientKeys(gateway_keys, relay_keys.public)
            direct_endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            burst_d, burst_got_d = _burst(sides.send, direct_endpoint, None, payload, n_burst)
            burst_r, burst_got_r = _burst(sides.send, endpoint, client_keys, payload, n_burst)
        finally:
            if sides is not None:
                sides.close()
            stop_child(parent, proc)
            pub.close(linger=0)
            with contextlib.suppress(Exception):
                ctx.term()
    (p50_d, p99_d), (p50_r, p99_r) = _percentiles(lat_d), _percentiles(lat_r)
    (pp50_d, pp99_d), (pp50_r, pp99_r) = _percentiles(paced_d), _percentiles(paced_r)
    rows = [
        ["latency p50, one in flight (µs)", p50_d, p50_r, p50_r / p50_d],
        ["latency p99, one in flight (µs)", p99_d, p99_r, p99_r / p99_d],
        [f"latency p50 at {rate:,.0f} msg/s (µs)", pp50_d, pp50_r, pp50_r / pp50_d],
        [f"latency p99 at {rate:,.0f} msg/s (µs)", pp99_d, pp99_r, pp99_r / pp99_d],
        ["throughput, burst (msg/s)", burst_d, burst_r, burst_r / burst_d if burst_d else 0.0],
        [
            "throughput, burst (MB/s)",
            burst_d * len(payload) / 1e6,
            burst_r * len(payload) / 1e6,
            burst_r / burst_d if burst_d else 0.0,
        ],
        ["delivered of burst", burst_got_d, burst_got_r, burst_got_r / max(1, burst_got_d)],
        ["delivered of paced", got_d, got_r, got_r / max(1, got_d)],
    ]
    print_table(
        f"KV events direct vs through kvroute relay (CURVE, own process; {len(payload)}-byte "
        f"payloads, size={size})",
        ["measure", "direct", "relay", "relay / direct"],
        rows,
    )
    data: dict[str, Any] = {
        "size": size,
        "payload_bytes": len(payload),
        "method": "latency: one process publishes and receives on both paths (the same message "
        "timed on each); the relay runs in its own process, CURVE between relay and subscriber, "
        "plain between publisher and relay, all on 127.0.0.1. Throughput: the same publisher "
        "sends a burst as fast as its PUB takes it, one path at a time, to a subscriber in a "
        "process of its own that times first to last message",
        "latency_one_in_flight_us": {
            "samples": n_latency,
            "direct": {"p50": p50_d, "p99": p99_d},
            "relay": {"p50": p50_r, "p99": p99_r},
        },
        "latency_paced_us": {
            "rate_per_s": rate,
            "messages": n_paced,
            "direct": {"p50": pp50_d, "p99": pp99_d, "delivered": got_d},
            "relay": {"p50": pp50_r, "p99": pp99_r, "delivered": got_r},
        },
        "throughput_burst": {
            "messages": n_burst,
            "direct": {"msg_per_s": burst_d, "delivered": burst_got_d},
            "relay": {"msg_per_s": burst_r, "delivered": burst_got_r},
        },
        "ratios_relay_over_direct": {str(r[0]): r[3] for r in rows},
    }
    data["path"] = str(save_json("relay", data, out_dir))
    bar_chart(
        out_dir / "relay.png",
        f"direct vs kvroute relay ({len(payload)} B messages)",
        ["direct", "relay"],
        [
            ("p50 µs, one in flight", [p50_d, p50_r]),
            ("p99 µs, one in flight", [p99_d, p99_r]),
            (f"p99 µs at {rate:,.0f}/s", [pp99_d, pp99_r]),
            ("burst msg/s", [burst_d, burst_r]),
        ],
    )
    return data
