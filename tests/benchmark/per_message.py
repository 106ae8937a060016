"""µs per live message through the real receive path (issue 12, deliverable 2).

A real PUB socket on 127.0.0.1 publishes vLLM 0.33 messages `[topic, seq8, payload]` (payloads
from `encode_batch` over `tests.event_streams.EngineStream`); the real `SubscriberManager`,
`SourceTracker` and either the real `PrefixIndex` or a stand-in whose `apply` does nothing
receive them in an asyncio loop. Two modes:

- **burst**: the whole run is queued in the SUB socket before the clock starts (published
  in-process while the loop is blocked, then we wait for ZeroMQ's I/O threads to go idle), so
  the drain measures poll + receive + seq check + decode + counters + apply and nothing else.
  Reported: wall µs per message and the main thread's CPU µs per message (`time.thread_time`,
  which leaves out ZeroMQ's I/O threads).
- **paced**: a child process publishes at a fixed rate (each message usually wakes the loop on
  its own, as at a real engine's rate); reported: main-thread CPU µs per message, which then
  includes a poll wake-up per message.

Run from the repository root:

    .venv/bin/python -m tests.benchmark.per_message                     # the table
    .venv/bin/python -m tests.benchmark.per_message --events 1 --index null --repeat 20
    py-spy record -r 1000 -f raw -o prof.txt -- .venv/bin/python -m tests.benchmark.per_message \
        --events 1 --index null --repeat 20
    .venv/bin/python -m tests.benchmark.per_message --summarise prof.txt

`tests/benchmark/test_per_message.py` runs it at a tiny size (structure and counts, not speed).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import linecache
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from kvroute.core import EventBatch, EventCounters, SourceId, SourceSpec, source_id
from kvroute.events import SubscriberManager, VllmEventBatch, encode_batch
from kvroute.index import PrefixIndex, create_index
from tests.event_streams import EngineStream
from tests.index_impl import IMPL, RECEIVE_IMPL

MODEL = "bench/model"
ENGINE = "bench"
SOURCE: SourceId = source_id(ENGINE, 0)
# Messages per burst run by events per message: about 20-40 MB of payloads, well under the SUB
# socket's 100,000-message high-water mark.
BURST_MESSAGES = {1: 50_000, 10: 20_000, 50: 5_000}
_HWM = 10_000_000
COALESCE_S = float(os.environ.get("KVROUTE_INGEST_COALESCE_MS", "0")) / 1000


class NullIndex(PrefixIndex):
    """The real index with `apply` cut to nothing: what the path costs without the index."""

    def apply(self, source: SourceId, batch: EventBatch) -> None:
        pass


@cache
def payloads(events: int, n: int, seed: int = 1) -> tuple[bytes, ...]:
    """`n` vLLM 0.33 payloads of `events` events each (chained stores, 15 % removals)."""
    stream = EngineStream(seed)
    return tuple(encode_batch(stream.batch(events, ts=1.0)) for _ in range(n))


_PROBE = encode_batch(VllmEventBatch(ts=0.0, events=[], data_parallel_rank=0))


@dataclass
class Result:
    mode: str
    events: int
    index: str
    messages: int
    wall_us: float  # per message
    cpu_us: float  # main-thread CPU per message
    applied_events: int
    dropped: int
    gaps: int


def _make(index_kind: str, context: zmq.asyncio.Context) -> tuple[SubscriberManager, PrefixIndex]:
    counters = EventCounters()
    # "real" is the implementation KVROUTE_INDEX_IMPL picks; "native", "python" name one.
    index: PrefixIndex
    if index_kind == "null":
        index = NullIndex(counters=counters)
    else:
        impl = {"real": IMPL}.get(index_kind, index_kind)
        index = create_index(counters=counters, impl=impl)  # type: ignore[arg-type]
    manager = SubscriberManager(
        index,
        counters,
        context=context,
        replay_timeout_s=1.0,
        max_concurrent_replays=1,
        retry_backoff_s=(0.5, 10.0),
        tail_check_s=0.0,
        receive_impl=RECEIVE_IMPL,
        coalesce_s=COALESCE_S,
    )
    return manager, index


def _tracker_last(manager: SubscriberManager) -> int | None:
    return manager._sources[SOURCE].tracker.last


def _io_idle(window_s: float = 0.02, quiet_s: float = 0.0005) -> None:
    """Block until the process's other threads (ZeroMQ's I/O threads) stop using CPU: every
    published message is then in the SUB socket's queue. A benchmark's wait, not a test's."""
    for _ in range(500):
        before = time.process_time() - time.thread_time()
        time.sleep(window_s)
        if time.process_time() - time.thread_time() - before < quiet_s:
            return


def _counts(counters: EventCounters) -> tuple[int, int, int]:
    applied = sum(v for (s, _t), v in counters.applied.items() if s == SOURCE)
    dropped = sum(v for (s, _r), v in counters.dropped.items() if s == SOURCE)
    return applied, dropped, counters.seq_gaps[SOURCE]


async def _subscribed(manager: SubscriberManager, send_probe: Any, timeout_s: float = 30) -> None:
    """Publish probes until one arrives live (the subscription reached the PUB)."""
    deadline = time.monotonic() + timeout_s
    while _tracker_last(manager) is None:
        if time.monotonic() > deadline:
            raise RuntimeError("per_message: no probe arrived")
        send_probe()
        await asyncio.sleep(0.005)


async def run_burst(events: int, index_kind: str, messages: int | None = None) -> Result:
    """Queue `messages` messages in the SUB socket, then time their drain."""
    n = messages if messages is not None else BURST_MESSAGES.get(events, 10_000)
    batch = payloads(events, n)
    pub_ctx = zmq.Context()
    pub = pub_ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.set_hwm(_HWM)
    pub.bind("tcp://127.0.0.1:0")
    endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    context = zmq.asyncio.Context()
    manager, index = _make(index_kind, context)
    seq = 0

    def send(payload: bytes) -> None:
        nonlocal seq
        pub.send_multipart((b"", seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
        seq += 1

    try:
        await manager.add_source(
            SourceSpec(engine=ENGINE, model=MODEL, endpoint=endpoint, replay_endpoint=None)
        )
        await _subscribed(manager, lambda: send(_PROBE))
        # Let the probes still in flight land, then queue the run with the loop blocked.
        _io_idle()
        await asyncio.sleep(0)
        while _tracker_last(manager) != seq - 1:
            await asyncio.sleep(0.001)
        counters = index.counters
        applied0, dropped0, gaps0 = _counts(counters)
        for payload in batch:
            send(payload)
        final = seq - 1
        _io_idle()
        t0, c0 = time.perf_counter(), time.thread_time()
        # Each loop turn of this spin is one turn of the subscriber's (at most 128 messages).
        while _tracker_last(manager) != final:
            await asyncio.sleep(0)
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        applied1, dropped1, gaps1 = _counts(counters)
        return Result(
            "burst", events, index_kind, n, wall / n * 1e6, cpu / n * 1e6,
            applied1 - applied0, dropped1 - dropped0, gaps1 - gaps0,
        )  # fmt: skip
    finally:
        await manager.close()
        context.destroy(linger=0)
        pub.close(linger=0)
        pub_ctx.term()


# --- paced: a publisher process at a fixed rate -----------------------------------------------


def _publisher_main(conn: Connection, events: int, n: int, rate: float) -> None:
    batch = payloads(events, n)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.set_hwm(_HWM)
    pub.bind("tcp://127.0.0.1:0")
    conn.send(pub.getsockopt_string(zmq.LAST_ENDPOINT))
    seq = 0
    while not conn.poll(0.005):
        pub.send_multipart((b"", seq.to_bytes(8, "big"), _PROBE))
        seq += 1
    conn.recv()
    conn.send(seq)  # the first seq of the run
    interval = 1.0 / rate
    t0 = time.monotonic()
    for i, payload in enumerate(batch):
        delay = t0 + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        pub.send_multipart((b"", seq.to_bytes(8, "big"), payload))
        seq += 1
    conn.send(seq - 1)
    conn.recv()
    pub.close(linger=0)
    ctx.term()


async def run_paced(events: int, index_kind: str, rate: float, seconds: float) -> Result:
    n = max(1, int(rate * seconds))
    payloads(events, n)  # built here too, so the child's build is not timed by us
    mp = multiprocessing.get_context("spawn")
    conn, child_conn = mp.Pipe()
    proc = mp.Process(target=_publisher_main, args=(child_conn, events, n, rate), daemon=True)
    proc.start()
    child_conn.close()
    context = zmq.asyncio.Context()
    manager, index = _make(index_kind, context)
    loop = asyncio.get_running_loop()
    try:
        endpoint = await asyncio.to_thread(conn.recv)
        await manager.add_source(
            SourceSpec(engine=ENGINE, model=MODEL, endpoint=endpoint, replay_endpoint=None)
        )
        await _subscribed(manager, lambda: None, timeout_s=60)
        counters = index.counters
        applied0, dropped0, gaps0 = _counts(counters)
        t0, c0 = time.perf_counter(), time.thread_time()
        conn.send("go")
        # Wait for the child's two answers without a timer: a reader on the pipe.
        answers: asyncio.Queue[int] = asyncio.Queue()
        loop.add_reader(conn.fileno(), lambda: answers.put_nowait(int(conn.recv())))
        first = await answers.get()
        final = await answers.get()
        loop.remove_reader(conn.fileno())
        while _tracker_last(manager) != final:
            await asyncio.sleep(0.001)
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        applied1, dropped1, gaps1 = _counts(counters)
        m = final - first + 1
        return Result(
            f"paced {rate:g}/s", events, index_kind, m, wall / m * 1e6, cpu / m * 1e6,
            applied1 - applied0, dropped1 - dropped0, gaps1 - gaps0,
        )  # fmt: skip
    finally:
        with contextlib.suppress(BrokenPipeError, OSError):
            conn.send("stop")
        await manager.close()
        context.destroy(linger=0)
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
        conn.close()


# --- the py-spy summary ------------------------------------------------------------------------

# (row, where a frame comes from): a sample counts for the first row any of its frames matches,
# in this order (so the socket calls inside the drain count as receive, not as the loop).
_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("index apply (PrefixIndex.apply)", ("kvroute/index/",)),
    (
        "decode (msgspec + the no-copy check, events/wire.py)",
        ("events/wire.py", "events/normalise.py"),
    ),
    ("counters (core/counters.py)", ("core/counters.py",)),
    (_FREE := "freeing the decoded batch (as `_apply` returns)", ()),
    ("tracker: seq check and bookkeeping (events/tracker.py)", ("events/tracker.py",)),
    ("receive (pyzmq recv calls)", ("zmq/sugar/socket.py", "zmq/backend/")),
    ("poll wake-up (zmq.asyncio Poller, futures)", ("zmq/_future.py", "zmq/asyncio.py")),
    ("subscriber loop itself (events/subscriber.py)", ("events/subscriber.py",)),
    ("asyncio event loop (select, callbacks)", ("asyncio/",)),
)
# Frames of this script that are not the path: building and publishing the run, waiting.
_HARNESS: tuple[str, ...] = (
    "payloads (",
    ".send (",
    "_io_idle (",
    "_subscribed (",
    "run_burst (",
    "run_paced (",
)
_SRC = Path(__file__).resolve().parents[2] / "src"


def _classify(frames: list[str], src: Path) -> str:
    """The `_ROWS` label of one sample (its frames, outermost first). pyzmq's receive is compiled,
    so a sample inside it shows as the subscriber line that calls `recv`."""
    leaf = frames[-1]
    if "events/subscriber.py:" in leaf and "recv" in _source_line(leaf, src):
        return "receive (pyzmq recv calls)"
    if "events/tracker.py:" in leaf and "self._apply(" in _source_line(leaf, src):
        return _FREE
    for label, where in _ROWS:
        if any(w in fr for fr in frames for w in where):
            return label
    return "other"


@cache
def _source_line(frame: str, src: Path) -> str:
    """The source text of a py-spy frame `func (kvroute/x.py:N)` under `src`, or ''."""
    where = frame.rpartition(" (")[2].rstrip(")")
    path, _, line = where.rpartition(":")
    if not path.startswith("kvroute/") or not line.isdigit():
        return ""
    return linecache.getline(str(src / path), int(line))


def summarise(path: str, src: Path = _SRC) -> list[tuple[str, float]]:
    """Shares of the samples of a `py-spy record -f raw` file spent in the receive path, by
    `_ROWS` (exclusive: each sample counts once). Left out: the harness's own samples, and the
    loop blocked in `select` (py-spy counts an epoll wait as active). `src`: the source tree
    the profile ran (its line numbers)."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n_text = line.rstrip("\n").rpartition(" ")
            if not stack or "run_forever" not in stack or "EpollSelector.select" in stack:
                continue
            if any(h in stack for h in _HARNESS):
                continue
            label = _classify(stack.split(";"), src)
            counts[label] += int(n_text)
            total += int(n_text)
    labels = [label for label, _where in _ROWS] + ["other"]
    return [(label, 100.0 * counts[label] / max(total, 1)) for label in labels]


# --- the command line --------------------------------------------------------------------------


def _table(results: Sequence[Result]) -> None:
    print(
        f"{'mode':<14}{'events':>7}{'index':>7}{'messages':>10}{'wall µs/msg':>13}"
        f"{'CPU µs/msg':>12}{'applied':>10}{'dropped':>9}{'gaps':>6}"
    )
    for r in results:
        print(
            f"{r.mode:<14}{r.events:>7}{r.index:>7}{r.messages:>10}{r.wall_us:>13.2f}"
            f"{r.cpu_us:>12.2f}{r.applied_events:>10}{r.dropped:>9}{r.gaps:>6}"
        )


def _best(runs: list[Result]) -> Result:
    """The run with the median main-thread CPU per message (wall follows it)."""
    ordered = sorted(runs, key=lambda r: r.cpu_us)
    return ordered[len(ordered) // 2]


async def _main(args: argparse.Namespace) -> list[Result]:
    out: list[Result] = []
    for events in args.events:
        for kind in args.index:
            runs = [await run_burst(events, kind, args.messages) for _ in range(args.repeat)]
            med = _best(runs)
            if args.repeat > 1:
                walls = [r.wall_us for r in runs]
                print(
                    f"  burst {events:>2} ev {kind:>4}: CPU µs/msg "
                    f"{', '.join(f'{r.cpu_us:.2f}' for r in runs)} "
                    f"(wall median {statistics.median(walls):.2f})",
                    file=sys.stderr,
                )
            out.append(med)
        for kind in args.index:
            if args.rate:
                out.append(await run_paced(events, kind, args.rate, args.seconds))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 10, 50])  # fmt: skip
    parser.add_argument("--index", type=lambda s: s.split(","), default=["real", "null"])
    parser.add_argument("--messages", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rate", type=float, default=0.0, help="paced runs: messages/s (0: none)")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--summarise", metavar="RAW", help="summarise a py-spy raw profile")
    parser.add_argument("--src", type=Path, default=_SRC, help="the src/ a profile ran")
    args = parser.parse_args(argv)
    if args.summarise:
        for label, share in summarise(args.summarise, args.src):
            print(f"{label:<60}{share:6.1f} %")
        return
    _table(asyncio.run(_main(args)))


if __name__ == "__main__":
    main()
