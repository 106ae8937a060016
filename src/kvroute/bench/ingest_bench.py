"""Benchmark (b): publisher process → ZMQ → decode → apply, end to end in the router process,
next to a raw pyzmq receive loop; and publish→applied latency per index implementation."""

# The latency run publishes at a fixed rate with the index already holding 10⁶ blocks.

from __future__ import annotations

import asyncio
import math
import multiprocessing
import struct
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

import zmq
import zmq.asyncio

from kvroute.bench.ingest_workload import ChainedWorkload, probe_event
from kvroute.bench.report import DEFAULT_OUT_DIR, print_table, save_json, stop_child
from kvroute.core import EventBatch, SourceSpec, source_id
from kvroute.events import (
    BatchDecoder,
    SubscriberManager,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEvent,
    VllmEventBatch,
    ZmqEventPublisher,
    encode_batch,
)
from kvroute.index import IndexLimits, PrefixIndex, create_index
from kvroute.index.impl import native_error, resolve_impl
from kvroute.metrics import Metrics

__all__ = ["run", "run_latency"]

_MODEL = "bench/model"
_EVENTS_PER_MESSAGE = 10
_BLOCKS = 4
_BLOCK_SIZE = 16
_REMOVE_SHARE = 0.10
_LATENCY_RATE = 50_000  # events/s for the latency run
_TARGET_EVENTS_PER_S = 300_000
_TARGET_P99_MS = 1.0
_TARGET_BLOCKS_HELD = 1_000_000  # blocks in the index before the latency run starts
# messages in the throughput runs, seconds of the fixed-rate latency run, blocks prefilled into
# the index before it
_SIZES = {"smoke": (2_000, 0.3, 20_000), "full": (60_000, 4.0, _TARGET_BLOCKS_HELD)}
_BURST_TS = 1.0  # ts of throughput messages; probes carry 0.0, latency messages their send time
# A latency message is encoded before the run with this ts and stamped with its send time as it
# goes: the ts is the payload's first element, a msgpack float64 right after the array header.
_STAMP_TS = 1.0
_STAMP_AT = 2  # offset of the float64's 8 bytes
_STAMP = struct.Struct(">d")
# The latency runs' index holds the prefill and everything the run stores: no cap evicts.
_LATENCY_LIMITS = IndexLimits(max_blocks_per_source=16_000_000, max_blocks_total=64_000_000)
_SOURCE = source_id("bench", 0)
_Impl = Literal["native", "python"]


def run(size: str = "smoke", out_dir: Path = DEFAULT_OUT_DIR) -> dict[str, Any]:
    """Run the ingest benchmark; print a table, save bench-results/ingest.json, return the data."""
    if size not in _SIZES:
        raise ValueError(f"size: expected one of {sorted(_SIZES)}, got {size!r}")
    messages, _latency_s, _prefill = _SIZES[size]
    baseline = _run_raw_baseline(messages)
    core = _run_core(messages)
    pipeline = asyncio.run(_run_pipeline(messages))
    no_index = asyncio.run(_run_pipeline(messages, noop=True))
    latency_part = _latency_part(size)
    result: dict[str, Any] = {
        "size": size,
        "messages": messages,
        "events_per_message": _EVENTS_PER_MESSAGE,
        "blocks_per_store": _BLOCKS,
        "block_size": _BLOCK_SIZE,
        "remove_share": _REMOVE_SHARE,
        "pipeline": pipeline,
        "baseline_raw_zmq": baseline,
        "baseline_decode_apply_in_process": core,
        "subscriber_decode_no_index": no_index,
        **latency_part,
        "targets": {
            "events_per_s": _TARGET_EVENTS_PER_S,
            "latency_p99_ms": _TARGET_P99_MS,
            "latency_rate_events_per_s": _LATENCY_RATE,
            "latency_blocks_held": _TARGET_BLOCKS_HELD,
        },
    }
    print_table(
        f"ingest: publisher process → ZMQ → decode → apply ({messages:,} messages of "
        f"{_EVENTS_PER_MESSAGE} events)",
        ["path", "messages/s", "events/s", "blocks/s", "publisher msg/s"],
        [
            [
                "subscriber + decode + index.apply",
                pipeline["messages_per_s"],
                pipeline["events_per_s"],
                pipeline["blocks_per_s"],
                pipeline["publisher_messages_per_s"],
            ],
            [
                "subscriber + decode (index.apply skipped)",
                no_index["messages_per_s"],
                no_index["events_per_s"],
                no_index["blocks_per_s"],
                no_index["publisher_messages_per_s"],
            ],
            [
                "baseline: decode + index.apply, no ZMQ",
                core["messages_per_s"],
                core["events_per_s"],
                core["blocks_per_s"],
                "-",
            ],
            [
                "baseline: raw pyzmq recv loop",
                baseline["messages_per_s"],
                baseline["events_per_s"],
                "-",
                baseline["publisher_messages_per_s"],
            ],
        ],
    )
    _print_latency(latency_part)
    save_json("ingest", result, out_dir)
    return result


def run_latency(size: str = "smoke", out_dir: Path = DEFAULT_OUT_DIR) -> dict[str, Any]:
    """Only the fixed-rate latency part (`kvroute bench ingest-latency`); saves
    bench-results/ingest-latency.json."""
    if size not in _SIZES:
        raise ValueError(f"size: expected one of {sorted(_SIZES)}, got {size!r}")
    result: dict[str, Any] = {
        "size": size,
        "events_per_message": _EVENTS_PER_MESSAGE,
        "blocks_per_store": _BLOCKS,
        "block_size": _BLOCK_SIZE,
        "remove_share": _REMOVE_SHARE,
        **_latency_part(size),
        "targets": {
            "latency_p99_ms": _TARGET_P99_MS,
            "latency_rate_events_per_s": _LATENCY_RATE,
            "latency_blocks_held": _TARGET_BLOCKS_HELD,
        },
    }
    _print_latency(result)
    save_json("ingest-latency", result, out_dir)
    return result


def latency_impls() -> list[_Impl]:
    """The index implementations the latency run measures here: native (when built), python."""
    return ["python"] if native_error() is not None else ["native", "python"]


def _latency_part(size: str) -> dict[str, Any]:
    """The no-index baseline, then each implementation with the index prefilled.

    `latency` is the implementation `kvroute serve` runs by default (native when built), kept
    under its old key; `latency_by_impl` has every implementation's row."""
    _messages, seconds, prefill = _SIZES[size]
    no_index = asyncio.run(_run_latency(seconds, impl=None, prefill_blocks=0))
    by_impl = {
        impl: asyncio.run(_run_latency(seconds, impl=impl, prefill_blocks=prefill))
        for impl in latency_impls()
    }
    return {
        "latency": by_impl[resolve_impl("auto")],
        "latency_no_index": no_index,
        "latency_by_impl": by_impl,
        "latency_prefill_blocks": prefill,
    }


def _print_latency(part: dict[str, Any]) -> None:
    rows: list[tuple[str, dict[str, Any]]] = [
        ("baseline: subscriber + decode (index.apply skipped)", part["latency_no_index"]),
    ]
    rows += [
        (f"subscriber + decode + index.apply, {impl} index", row)
        for impl, row in part["latency_by_impl"].items()
    ]
    print_table(
        f"ingest latency: publish → applied at {_LATENCY_RATE:,} events/s, index prefilled "
        f"with {part['latency_prefill_blocks']:,} blocks (target: p99 < {_TARGET_P99_MS:g} ms "
        f"with {_TARGET_BLOCKS_HELD:,} held)",
        [
            "path",
            "blocks held at start",
            "at end",
            "samples",
            "p50 ms",
            "p99 ms",
            "max ms",
            "p99 ms, slice's worst",
            "loop CPU µs/event",
            "target p99 ms",
        ],
        [
            [
                label,
                row["blocks_held_at_start"],
                row["blocks_held_at_end"],
                row["samples"],
                row["p50_ms"],
                row["p99_ms"],
                row["max_ms"],
                row["p99_slice_worst_ms"],
                row["loop_cpu_us_per_event"],
                _TARGET_P99_MS,
            ]
            for label, row in rows
        ],
    )


# --- the workload ------------------------------------------------------------------------------


def _workload(seed: int = 0) -> ChainedWorkload:
    """4-block BlockStored chained from a held block (or the root), and 10% BlockRemoved of a
    leaf block, so the index really chains and removes (bench/ingest_workload.py)."""
    return ChainedWorkload(
        seed=seed, blocks_per_store=_BLOCKS, block_size=_BLOCK_SIZE, remove_share=_REMOVE_SHARE
    )


def _blocks(events: Sequence[VllmEvent]) -> int:
    """Blocks an event batch touches (stored + removed)."""
    return sum(
        len(e.block_hashes) for e in events if isinstance(e, (VllmBlockStored, VllmBlockRemoved))
    )


# --- the publisher process ---------------------------------------------------------------------


def _publisher_main(conn: Connection, mode: str, amount: float) -> None:
    """Child process: bind our publisher, publish probes until "go", then the burst or the
    fixed-rate stream; report (first seq, last seq, events, blocks, publish seconds, send time
    of each message of a fixed-rate stream)."""
    asyncio.run(_publisher(conn, mode, amount))


async def _publisher(conn: Connection, mode: str, amount: float) -> None:
    pub = ZmqEventPublisher(
        "tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", hwm=10_000_000
    )
    await pub.start()
    workload = _workload()
    burst: list[bytes] = []
    stamped: list[bytearray] = []  # the fixed-rate stream, stamped as it is sent
    sent: list[float] = []
    blocks = 0
    count = int(amount) if mode == "burst" else int(amount * _LATENCY_RATE / _EVENTS_PER_MESSAGE)
    for _ in range(count):
        # Encoded before the run, so the stream's CPU is not taken from the router: generating
        # and encoding the events in Python took ~70 % of a core at 5,000 messages/s, and this
        # host has two (docs/notes/issue-12-next.md, seventh session).
        events = workload.events(_EVENTS_PER_MESSAGE)
        blocks += _blocks(events)
        if mode == "burst":
            burst.append(encode_batch(VllmEventBatch(ts=_BURST_TS, events=events), pub.release))
        else:
            payload = encode_batch(VllmEventBatch(ts=_STAMP_TS, events=events), pub.release)
            if payload[_STAMP_AT - 1 : _STAMP_AT + 8] != b"\xcb" + _STAMP.pack(_STAMP_TS):
                raise RuntimeError("ingest bench: the batch's ts is not where it is stamped")
            stamped.append(bytearray(payload))
    conn.send((pub.endpoint, pub.replay_endpoint))
    try:
        probes = 0
        while not conn.poll(0.005):  # probes until the router says it sees the live stream
            # Outside the workload's hashes: its stream comes after them and chains only itself.
            pub.publish(VllmEventBatch(ts=0.0, events=[probe_event(probes, _BLOCK_SIZE)]))
            probes += 1
            await asyncio.sleep(0)
        conn.recv()
        first = pub.next_seq
        conn.send(first)
        start = time.perf_counter()
        if mode == "burst":
            for payload in burst:
                pub.publish_payload(payload)
            events_sent = len(burst) * _EVENTS_PER_MESSAGE
        else:
            interval = _EVENTS_PER_MESSAGE / _LATENCY_RATE
            t0 = time.monotonic()
            for i, buf in enumerate(stamped):
                due = t0 + i * interval
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # no spinning: the router needs the other core
                ts = time.monotonic()
                _STAMP.pack_into(buf, _STAMP_AT, ts)
                pub.publish_payload(bytes(buf))
                sent.append(ts)
            events_sent = len(stamped) * _EVENTS_PER_MESSAGE
        elapsed = time.perf_counter() - start
        conn.send((first, pub.next_seq - 1, events_sent, blocks, elapsed, sent))
        conn.recv()  # "stop": keep the sockets open until the router has everything
    finally:
        await pub.close()


class _Child:
    """One publisher process (spawned, so it shares nothing with the router)."""

    def __init__(self, mode: str, amount: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(
            target=_publisher_main, args=(child_conn, mode, amount), daemon=True
        )
        self.proc.start()
        child_conn.close()

    def endpoints(self, timeout_s: float = 60.0) -> tuple[str, str]:
        if not self.conn.poll(timeout_s):
            raise RuntimeError("ingest bench: the publisher process did not start")
        endpoint, replay = self.conn.recv()
        return str(endpoint), str(replay)

    def go(self, timeout_s: float = 30.0) -> int:
        """Start the burst (or stream); returns the seq of its first batch."""
        self.conn.send("go")
        if not self.conn.poll(timeout_s):
            raise RuntimeError("ingest bench: the publisher process did not answer")
        return int(self.conn.recv())

    def report(self, timeout_s: float = 120.0) -> tuple[int, int, int, int, float, list[float]]:
        if not self.conn.poll(timeout_s):
            raise RuntimeError("ingest bench: the publisher process did not finish")
        first, last, events, blocks, elapsed, sent = self.conn.recv()
        return int(first), int(last), int(events), int(blocks), float(elapsed), list(sent)

    def stop(self) -> None:
        stop_child(self.conn, self.proc)


# --- the router side ---------------------------------------------------------------------------


class _Timing:
    """Wraps an index's `apply` (either implementation), noting when burst batches are applied
    and publish→apply latencies; `noop` skips the apply itself."""

    def __init__(self, index: PrefixIndex, *, noop: bool = False) -> None:
        self.index = index
        self.noop = noop
        self.burst_applied = 0
        self.first_t: float | None = None
        self.last_t = 0.0
        self.slices: list[tuple[float, int, float]] = []  # (applied at, messages, first ts)
        self.record_latency = False
        self._apply = index.apply
        # The tracker calls `index.apply`: the instance attribute shadows the class's method.
        setattr(index, "apply", self.apply)  # noqa: B010

    def latencies(self, sent: Sequence[float]) -> tuple[list[float], list[float]]:
        """Publish→applied per message (its own send time `sent[k]` to its slice's apply), and
        the measure used before: each message at its slice's worst latency, which counted a
        message at the head of a backlog's slice as late as the slice's oldest."""
        position = {ts: k for k, ts in enumerate(sent)}
        own: list[float] = []
        worst: list[float] = []
        for now, messages, ts in self.slices:
            k = position.get(ts)
            if k is None:
                continue  # not a message of the stream
            own += [now - t for t in sent[k : k + messages]]
            worst += [now - ts] * messages
        return own, worst

    def apply(self, source: Any, batch: EventBatch) -> None:
        if not self.noop:
            self._apply(source, batch)
        ts = batch.ts
        if ts <= 0.0:
            return
        now = time.monotonic()
        if self.record_latency:
            # A slice applied as one batch carries its first message's ts only; its messages
            # are the ones sent next (`latencies` looks up each one's own send time).
            self.slices.append((now, max(1, len(batch.events) // _EVENTS_PER_MESSAGE), ts))
            return
        self.burst_applied += 1  # apply calls: one per received slice (tracker.on_live_run)
        if self.first_t is None:
            self.first_t = now
        self.last_t = now


async def _router(
    child: _Child, index: PrefixIndex, metrics: Metrics
) -> tuple[SubscriberManager, int]:
    endpoint, replay = await asyncio.to_thread(child.endpoints)
    manager = SubscriberManager(
        index,
        metrics.event_counters,
        replay_timeout_s=2.0,
        max_concurrent_replays=4,
        retry_backoff_s=(0.5, 10.0),
        tail_check_s=0.0,
    )
    await manager.add_source(
        SourceSpec(engine="bench", model=_MODEL, endpoint=endpoint, replay_endpoint=replay)
    )
    # Wait until a probe arrives live (the subscription reached the PUB), then start.
    deadline = time.monotonic() + 30
    seen = None
    while True:
        status = manager.status()[0]
        if status.last_seq is not None:
            if seen is not None and status.last_seq > seen:
                break
            seen = status.last_seq
        if time.monotonic() > deadline:
            raise RuntimeError("ingest bench: no probe arrived")
        await asyncio.sleep(0.02)
    return manager, await asyncio.to_thread(child.go)


async def _applied(manager: SubscriberManager, seq: int, timeout_s: float) -> bool:
    """Poll until the one source has applied `seq` (False after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        last = manager.status()[0].last_seq
        if last is not None and last >= seq:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)


async def _run_pipeline(messages: int, *, noop: bool = False) -> dict[str, Any]:
    child = _Child("burst", messages)
    metrics = Metrics()
    index = PrefixIndex(counters=metrics.event_counters)
    timing = _Timing(index, noop=noop)
    manager = None
    try:
        manager, _first = await _router(child, index, metrics)
        first, last, events, blocks, pub_s, _sent = await asyncio.to_thread(child.report)
        ok = await _applied(manager, last, timeout_s=120)
        if not ok:
            raise RuntimeError("ingest bench: the router did not apply every batch")
        elapsed = max(timing.last_t - (timing.first_t or timing.last_t), 1e-9)
        gaps = metrics.registry.get_sample_value("kvroute_seq_gaps_total", {"source": "bench/0"})
        return {
            "messages": last - first + 1,
            "seconds": elapsed,
            "messages_per_s": (last - first + 1) / elapsed,
            "events_per_s": events / elapsed,
            "blocks_per_s": blocks / elapsed,
            "publisher_messages_per_s": (last - first + 1) / pub_s,
            "seq_gaps": int(gaps or 0),
            "blocks_indexed": index.source_block_count(source_id("bench", 0)),
        }
    finally:
        if manager is not None:
            await manager.close()
        child.stop()


async def _run_latency(
    seconds: float, *, impl: _Impl | None, prefill_blocks: int
) -> dict[str, Any]:
    """Publish at `_LATENCY_RATE` for `seconds` into an index of implementation `impl` (None: the
    apply skipped) that already holds `prefill_blocks` blocks of the same source."""
    metrics = Metrics()
    if impl is None:
        index = PrefixIndex(counters=metrics.event_counters)
    else:
        index = create_index(_LATENCY_LIMITS, counters=metrics.event_counters, impl=impl)
    child = _Child("rate", seconds)  # starts while the index fills
    manager = None
    try:
        index.add_source(_SOURCE, engine="bench", model=_MODEL)
        t = time.perf_counter()
        _prefill(index, prefill_blocks)
        prefill_s = time.perf_counter() - t
        held = index.source_block_count(_SOURCE)
        timing = _Timing(index, noop=impl is None)
        timing.record_latency = True
        manager, _first = await _router(child, index, metrics)
        cpu0, loop0, wall0 = time.process_time(), time.thread_time(), time.perf_counter()
        _first, last, events, _blocks, _pub_s, sent = await asyncio.to_thread(
            child.report, seconds + 60
        )
        await _applied(manager, last, timeout_s=60)
        cpu = time.process_time() - cpu0
        loop_cpu = time.thread_time() - loop0
        wall = time.perf_counter() - wall0
        own, worst = timing.latencies(sent)
        lat = sorted(own)
        worst.sort()
        n = len(lat)

        def pct(p: float, values: list[float] = lat) -> float:
            return values[min(len(values) - 1, int(p * len(values)))] * 1000 if values else math.nan

        return {
            "impl": impl if impl is not None else "none",
            "rate_events_per_s": _LATENCY_RATE,
            "events": events,
            "blocks_held_at_start": held,
            "blocks_held_at_end": index.source_block_count(_SOURCE),
            "prefill_seconds": prefill_s,
            "samples": n,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "p999_ms": pct(0.999),
            "max_ms": lat[-1] * 1000 if n else float("nan"),
            # The measure before the seventh session: each message at its slice's worst.
            "p99_slice_worst_ms": pct(0.99, worst),
            "seconds": wall,
            "process_cpu_seconds": cpu,
            "loop_cpu_seconds": loop_cpu,
            "loop_cpu_us_per_event": loop_cpu / events * 1e6 if events else float("nan"),
        }
    finally:
        if manager is not None:
            await manager.close()
        child.stop()


_VOCAB = 131_072
_PREFILL_HASH = 1 << 44  # engine hashes of prefill blocks: beyond the workload's and probes'
_PREFILL_TOKEN = _VOCAB + 11  # first token id of a prefill block: never in the workload
_PREFILL_CHAIN = 8  # stores per chain


def _prefill_store(k: int) -> VllmBlockStored:
    """Prefill store `k`: `_BLOCKS` blocks continuing store k − 1 (chains of `_PREFILL_CHAIN`)
    with token ids unique per block, so no block hashes like another or a workload block."""
    first = k * _BLOCKS
    tokens: list[int] = []
    for b in range(first, first + _BLOCKS):
        tokens += [_PREFILL_TOKEN, b % _VOCAB, b // _VOCAB]
        tokens += [_PREFILL_TOKEN] * (_BLOCK_SIZE - 3)
    return VllmBlockStored(
        block_hashes=[_PREFILL_HASH + b + 1 for b in range(first, first + _BLOCKS)],
        parent_block_hash=None if k % _PREFILL_CHAIN == 0 else _PREFILL_HASH + first,
        token_ids=tokens,
        block_size=_BLOCK_SIZE,
        medium="GPU",
    )


def _prefill(index: PrefixIndex, blocks: int, per_batch: int = 1000) -> None:
    """Store `blocks` blocks for the bench source straight through `index.apply` (decoded from
    real payloads, so the index sees what the tracker would hand it)."""
    decoder = BatchDecoder()
    stores = -(-blocks // _BLOCKS)
    for start in range(0, stores, per_batch):
        events: list[VllmEvent] = [
            _prefill_store(k) for k in range(start, min(start + per_batch, stores))
        ]
        index.apply(_SOURCE, decoder.decode(encode_batch(VllmEventBatch(ts=0.0, events=events))))


def _run_core(messages: int) -> dict[str, Any]:
    """The same messages decoded and applied in a plain loop: the ceiling without transport."""
    workload = _workload()
    payloads = []
    blocks = 0
    for _ in range(messages):
        events = workload.events(_EVENTS_PER_MESSAGE)
        blocks += _blocks(events)
        payloads.append(encode_batch(VllmEventBatch(ts=_BURST_TS, events=events)))
    metrics = Metrics()
    index = PrefixIndex(counters=metrics.event_counters)
    source = source_id("bench", 0)
    index.add_source(source, engine="bench", model=_MODEL)
    decoder = BatchDecoder()
    start = time.perf_counter()
    decode_s = 0.0
    for payload in payloads:
        t = time.perf_counter()
        batch = decoder.decode(payload)
        decode_s += time.perf_counter() - t
        index.apply(source, batch)
    elapsed = max(time.perf_counter() - start, 1e-9)
    return {
        "messages": messages,
        "seconds": elapsed,
        "messages_per_s": messages / elapsed,
        "events_per_s": messages * _EVENTS_PER_MESSAGE / elapsed,
        "blocks_per_s": blocks / elapsed,
        "decode_us_per_message": decode_s / messages * 1e6,
        "apply_us_per_message": (elapsed - decode_s) / messages * 1e6,
    }


def _run_raw_baseline(messages: int) -> dict[str, Any]:
    """The same burst received by a plain blocking pyzmq SUB loop: no decode, no index."""
    child = _Child("burst", messages)
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    try:
        endpoint, _replay = child.endpoints()
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 10_000_000)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoint)
        if not sub.poll(30_000):
            raise RuntimeError("ingest bench: no probe arrived")
        first_seq = child.go()
        last_seq = first_seq + messages - 1
        received = 0
        start = end = 0.0
        while sub.poll(1000):
            frames = sub.recv_multipart()
            seq = int.from_bytes(frames[1], "big")
            if seq < first_seq:
                continue  # a probe still queued
            if received == 0:
                start = time.perf_counter()
            received += 1
            end = time.perf_counter()
            if seq >= last_seq:
                break
        _first, _last, _events, _blocks, pub_s, _sent = child.report()
        burst = messages
        elapsed = max(end - start, 1e-9)
        return {
            "messages": burst,
            "received": received,
            "seconds": elapsed,
            "messages_per_s": received / elapsed,
            "events_per_s": received * _EVENTS_PER_MESSAGE / elapsed,
            "publisher_messages_per_s": burst / pub_s,
        }
    finally:
        sub.close(linger=0)
        context.term()
        child.stop()
