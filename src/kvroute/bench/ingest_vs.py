"""`kvroute bench ingest --vs dynamo`: `kvroute serve` and NVIDIA Dynamo's standalone indexer
ingest the same publisher's stream side by side."""

# Dynamo is `python -m dynamo.indexer --threads 1`, ai-dynamo-runtime 1.6.1 in `.venv-peers`,
# installed by `make bench-peers`.
#
# One publisher process binds a vLLM-style PUB socket (and replay ROUTER); both systems connect to
# it, so they receive byte-identical messages. Per events-per-message setting:
#
# 1. warm-up: the publisher sends one-block probes until both systems have seen one (the slow
#    joiner), then stops; both must have applied every probe (early ones arrive by replay);
# 2. timed: the publisher sends the whole workload as fast as it can; a system is done when it has
#    applied all of it (kvroute: its source's last applied seq on `/debug/engines`; Dynamo: the
#    sum of `dynamo_kvrouter_kv_cache_events_applied` over every status on `/metrics`);
#    events/s = events / (done − first timed send), both on the host's monotonic clock;
# 3. CPU seconds (utime + stime of the process, all threads) over the timed phase, RSS after it;
# 4. correctness: each system is asked for sampled prompts whose blocks are all held (expect all)
#    and prompts that lost blocks (expect the leading held ones); kvroute via `POST /v1/route`,
#    Dynamo via `POST /query` (matched tokens / block size); plus each one's applied and dropped
#    counters over the timed phase.

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvroute import __version__
from kvroute.bench.ingest_workload import (
    ChainedWorkload,
    PrefixSample,
    encode_events,
    group_payloads,
    probe_event,
)
from kvroute.bench.peers import PeerMissing, find_peer
from kvroute.bench.processes import free_port, rss_bytes
from kvroute.bench.report import DEFAULT_OUT_DIR, print_table, save_json, stop_child

__all__ = [
    "DYNAMO_VERSION",
    "SIZES",
    "DynamoPeer",
    "PeerMissing",
    "find_dynamo",
    "parse_per_message",
    "result_rows",
    "run",
]

DYNAMO_VERSION: Final = "1.6.1"
SIZES: Final = {"smoke": 20_000, "full": 500_000}  # events
PER_MESSAGE: Final = (1, 10, 50)
STORED_SAMPLES: Final = 24
REMOVED_SAMPLES: Final = 8
MODEL: Final = "bench/model"
ENGINE: Final = "bench"
BLOCK_SIZE: Final = 16
BLOCKS_PER_STORE: Final = 4
REMOVE_SHARE: Final = 0.10
_WORKER_ID: Final = 1
_POLL_S: Final = 0.02
_STALL_S: Final = 60.0  # a system that applies nothing for this long is given up on
_PROBE_INTERVAL_S: Final = 0.01
_EVICTED: Final = "dropped/over_limit"  # kvroute's cap evicting held blocks: blocks, not events
# kvroute serve with one fake engine: nothing answers its URL, so health probes and scrapes are
# pushed out of the run (an engine stays healthy until `unhealthy_after` failures). The ingest
# budgets are off: they bound what a hostile engine may cost (design §16; defaults 1 MiB/s and
# 50k events/s per source, 18x a busy engine's bytes), and this benchmark measures how fast one
# source can be ingested at all, as Dynamo (which has no such budget) is measured. Every other
# setting is kvroute's default or the caller's own KVROUTE_* environment.
_KVROUTE_ENV: Final = {
    "KVROUTE_HEALTH_INTERVAL_S": "3600",
    "KVROUTE_SCRAPE_INTERVAL_S": "3600",
    "KVROUTE_UNHEALTHY_AFTER": "1000000",
    "KVROUTE_SOURCE_EVENTS_PER_S": "0",
    "KVROUTE_SOURCE_BYTES_PER_S": "0",
    "KVROUTE_TOTAL_EVENTS_PER_S": "0",
    "KVROUTE_TOTAL_BYTES_PER_S": "0",
}


@dataclass(frozen=True)
class DynamoPeer:
    python: Path
    version: str


def find_dynamo(venv: Path | None = None) -> DynamoPeer:
    """Dynamo's indexer in `venv` (default: `.venv-peers` in the working directory, then in the
    source checkout); PeerMissing with the fix when it is not there."""
    peer = find_peer(
        venv,
        Path("dynamo/indexer/__main__.py"),
        "ai_dynamo_runtime",
        f"Dynamo's indexer (ai-dynamo-runtime=={DYNAMO_VERSION})",
    )
    return DynamoPeer(python=peer.python, version=peer.version)


def parse_per_message(text: str) -> tuple[int, ...]:
    """Parse "1,10,50" into (1, 10, 50); ValueError naming a bad item."""
    out = []
    for item in text.split(","):
        try:
            n = int(item)
        except ValueError:
            raise ValueError(f"events per message: expected integers, got {item!r}") from None
        if not 1 <= n <= 0xFFFF:
            raise ValueError(f"events per message: expected 1 to 65535, got {n}")
        out.append(n)
    if not out:
        raise ValueError("events per message: expected at least one number")
    return tuple(out)


# --- process facts -------------------------------------------------------------------------------

_CLK_TCK: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _index_impl() -> str:
    """The index implementation `kvroute serve` resolves to here (same interpreter and env)."""
    try:
        resolve = importlib.import_module("kvroute.index.impl").resolve_impl
        return str(resolve(os.environ.get("KVROUTE_INDEX_IMPL", "auto").lower()))
    except Exception as exc:  # an index without the switch, or a bad value: say so, run anyway
        return f"unknown ({exc})"


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _metric_samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, sample.labels, sample.value


# --- the two systems -----------------------------------------------------------------------------


class _System:
    """A system under test: a child process with an HTTP API."""

    name = ""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, port: int) -> None:
        self.port = port
        self.log = log
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_up(self, path: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.proc.returncode}): {self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get(path).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not answer {path}: {self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    # what the harness asks
    def progress(self) -> int:
        """Monotonic progress, compared against `target`."""
        raise NotImplementedError

    target = 0

    def counters(self) -> dict[str, float]:
        raise NotImplementedError

    def matched_blocks(self, token_ids: list[int]) -> int:
        raise NotImplementedError


class _Kvroute(_System):
    name = "kvroute"

    def __init__(self, workdir: Path, endpoint: str, replay: str) -> None:
        fleet = workdir / "fleet.yaml"
        fleet.write_text(
            "engines:\n"
            f"  - name: {ENGINE}\n"
            f"    model: {MODEL}\n"
            f"    url: http://127.0.0.1:{free_port()}\n"
            f"    events: {endpoint}\n"
            f"    replay: {replay}\n"
        )
        port = free_port()
        cmd = [sys.executable, "-m", "kvroute.cli", "serve", "--fleet", str(fleet)]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        super().__init__(cmd, {**os.environ, **_KVROUTE_ENV}, workdir / "kvroute.log", port)
        self.source = f"{ENGINE}/0"

    def start(self) -> None:
        self.wait_up("/healthz")

    def progress(self) -> int:
        """The last applied seq (−1 before the first)."""
        engines = self.http.get("/debug/engines").json()["engines"]
        seq = engines[0]["sources"][0]["last_seq"] if engines and engines[0]["sources"] else None
        return -1 if seq is None else int(seq)

    def counters(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, labels, value in _metric_samples(self.http.get("/metrics").text):
            if labels.get("source") != self.source:
                continue
            if name == "kvroute_events_applied_total":
                out[f"applied/{labels['type']}"] = value
            elif name == "kvroute_events_dropped_total":
                out[f"dropped/{labels['reason']}"] = value
        return out

    def matched_blocks(self, token_ids: list[int]) -> int:
        answer = self.http.post("/v1/route", json={"model": MODEL, "prompt": token_ids})
        answer.raise_for_status()
        engines = answer.json()["engines"]
        return int(engines[0]["blocks_matched"]) if engines else 0


class _Dynamo(_System):
    name = "dynamo"

    def __init__(self, workdir: Path, peer: DynamoPeer) -> None:
        port = free_port()
        cmd = [str(peer.python), "-m", "dynamo.indexer", "--threads", "1", "--port", str(port)]
        env = {**os.environ, "NO_COLOR": "1"}
        super().__init__(cmd, env, workdir / "dynamo.log", port)

    def start(self, endpoint: str, replay: str) -> None:
        self.wait_up("/health")
        body = {
            "instance_id": _WORKER_ID,
            "endpoint": endpoint,
            "replay_endpoint": replay,
            "model_name": MODEL,
            "block_size": BLOCK_SIZE,
        }
        answer = self.http.post("/register", json=body)
        if answer.status_code >= 300:
            raise RuntimeError(f"dynamo /register: {answer.status_code} {answer.text}")

    def _applied(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, labels, value in _metric_samples(self.http.get("/metrics").text):
            if name == "dynamo_kvrouter_kv_cache_events_applied_total" or (
                name == "dynamo_kvrouter_kv_cache_events_applied"
            ):
                out[f"{labels.get('event_type')}/{labels.get('status')}"] = value
        return out

    def progress(self) -> int:
        """Events handled, whatever their status."""
        return int(sum(self._applied().values()))

    def counters(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, value in self._applied().items():
            kind, status = key.split("/", 1)
            label = f"applied/{kind}" if status == "ok" else f"dropped/{kind}:{status}"
            out[label] = out.get(label, 0.0) + value
        return out

    def matched_blocks(self, token_ids: list[int]) -> int:
        answer = self.http.post("/query", json={"token_ids": token_ids, "model_name": MODEL})
        answer.raise_for_status()
        scores = answer.json().get("scores", {}).get(str(_WORKER_ID), {})
        return int(scores.get("0", 0)) // BLOCK_SIZE


# --- the publisher process -----------------------------------------------------------------------


def _publisher_main(conn: Connection, payloads: list[bytes]) -> None:
    import asyncio

    asyncio.run(_publisher(conn, payloads))


async def _publisher(conn: Connection, payloads: list[bytes]) -> None:
    """Bind PUB and replay ROUTER; on "probe" send probes until "quiet", on "go" the payloads."""
    import asyncio

    from kvroute.events import VllmEventBatch, ZmqEventPublisher

    async def wait_for(what: str) -> None:
        while not conn.poll():  # keep the loop turning: the replay ROUTER answers meanwhile
            await asyncio.sleep(0.005)
        got = conn.recv()
        if got != what:
            raise RuntimeError(f"publisher: expected {what!r}, got {got!r}")

    pub = ZmqEventPublisher(
        "tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", hwm=50_000_000
    )
    await pub.start()
    try:
        conn.send((pub.endpoint, pub.replay_endpoint))
        await wait_for("probe")
        probes = 0
        while not conn.poll():
            pub.publish(VllmEventBatch(ts=0.0, events=[probe_event(probes, BLOCK_SIZE)]))
            probes += 1
            await asyncio.sleep(_PROBE_INTERVAL_S)
        if conn.recv() != "quiet":
            raise RuntimeError("publisher: expected 'quiet'")
        conn.send(probes)
        await wait_for("go")
        first = pub.next_seq
        start = time.monotonic()
        for payload in payloads:
            pub.publish_payload(payload)
        elapsed = time.monotonic() - start
        conn.send((start, first, pub.next_seq - 1, elapsed))
        await wait_for("stop")
    finally:
        await pub.close()


class _Publisher:
    def __init__(self, payloads: list[bytes]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_publisher_main, args=(child, payloads), daemon=True)
        self.proc.start()
        child.close()

    def recv(self, timeout_s: float) -> Any:
        if not self.conn.poll(timeout_s):
            raise RuntimeError("ingest --vs: the publisher process did not answer")
        return self.conn.recv()

    def stop(self) -> None:
        stop_child(self.conn, self.proc)


# --- one run -------------------------------------------------------------------------------------


@dataclass
class _Progress:
    system: _System
    target: int
    cpu0: float = 0.0
    last: int = -(1 << 62)
    last_change: float = field(default_factory=time.monotonic)
    done_at: float | None = None
    cpu: float = float("nan")
    gave_up: bool = False


def _wait(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"ingest --vs: timed out waiting for {what}")
        time.sleep(_POLL_S)


def _median_run(tries: list[dict[str, Any]]) -> dict[str, Any]:
    """One run from repeated ones: per system, the try with its median events per CPU-second
    (single runs of either system vary by up to 1.4x on a shared 2-core machine)."""
    if len(tries) == 1:
        return tries[0]
    out = dict(tries[len(tries) // 2])
    systems: dict[str, Any] = {}
    for name in tries[0]["systems"]:
        ranked = sorted(tries, key=lambda t: t["systems"][name]["events_per_cpu_s"])
        systems[name] = ranked[len(ranked) // 2]["systems"][name]
    out["systems"] = systems
    out["repeats"] = len(tries)
    return out


def _run_one(
    per_message: int,
    events: Sequence[bytes],
    samples: Sequence[PrefixSample],
    peer: DynamoPeer | None,
    workdir: Path,
) -> dict[str, Any]:
    payloads = group_payloads(events, per_message)
    load_before = _loadavg()
    publisher = _Publisher(payloads)
    systems: list[_System] = []
    try:
        endpoint, replay = publisher.recv(120)
        kvroute = _Kvroute(workdir, endpoint, replay)
        systems.append(kvroute)
        dynamo = None
        if peer is not None:
            dynamo = _Dynamo(workdir, peer)
            systems.append(dynamo)
        kvroute.start()
        if dynamo is not None:
            dynamo.start(endpoint, replay)
        # warm-up: probes until both hear the live stream, then all probes applied by both
        publisher.conn.send("probe")
        _wait("the first probe", lambda: all(s.progress() > 0 for s in systems), 60)
        publisher.conn.send("quiet")
        probes = int(publisher.recv(30))
        kvroute.target = probes - 1  # last seq of the probes
        if dynamo is not None:
            dynamo.target = probes
        _wait("every probe", lambda: all(s.progress() >= s.target for s in systems), 60)
        base = {s.name: s.counters() for s in systems}
        kvroute.target = probes - 1 + len(payloads)
        if dynamo is not None:  # from what it counted, should a probe have come twice
            dynamo.target = dynamo.progress() + len(events)
        tracks = [_Progress(s, s.target, cpu0=cpu_seconds(s.pid)) for s in systems]
        publisher.conn.send("go")
        sent: tuple[float, int, int, float] | None = None
        while any(t.done_at is None and not t.gave_up for t in tracks):
            time.sleep(_POLL_S)
            if sent is None and publisher.conn.poll():
                sent = publisher.conn.recv()
            for t in tracks:
                if t.done_at is not None or t.gave_up:
                    continue
                now = time.monotonic()
                value = t.system.progress()
                if value >= t.target:
                    t.done_at = now
                    t.cpu = cpu_seconds(t.system.pid) - t.cpu0
                elif value != t.last:
                    t.last, t.last_change = value, now
                elif now - t.last_change > _STALL_S:
                    t.gave_up = True
                    t.cpu = cpu_seconds(t.system.pid) - t.cpu0
        if sent is None:
            sent = publisher.recv(60)
        start, first_seq, last_seq, publish_s = sent
        if last_seq - first_seq + 1 != len(payloads):
            raise RuntimeError("ingest --vs: the publisher sent a different number of batches")
        out: dict[str, Any] = {
            "events_per_message": per_message,
            "messages": len(payloads),
            "events": len(events),
            "probes": probes,
            "publisher_seconds": publish_s,
            "publisher_messages_per_s": len(payloads) / max(publish_s, 1e-9),
            # other work on the host skews every figure: the 1-minute load before and after
            "load_average_1m": [load_before, _loadavg()],
            "systems": {},
        }
        for t in tracks:
            s = t.system
            seconds = (t.done_at - start) if t.done_at is not None else float("nan")
            after = s.counters()
            delta = {
                k: after.get(k, 0.0) - base[s.name].get(k, 0.0)
                for k in sorted(set(after) | set(base[s.name]))
            }
            delta = {k: v for k, v in delta.items() if v}
            out["systems"][s.name] = {
                "complete": t.done_at is not None,
                "seconds": seconds,
                "events_per_s": len(events) / seconds if t.done_at is not None else 0.0,
                "cpu_seconds": t.cpu,
                "cores": t.cpu / seconds if t.done_at is not None else float("nan"),
                "events_per_cpu_s": len(events) / t.cpu if t.cpu > 0 else float("nan"),
                "rss_mb": rss_bytes(s.pid) / 2**20,
                "applied": int(sum(v for k, v in delta.items() if k.startswith("applied/"))),
                "dropped": int(
                    sum(v for k, v in delta.items() if k.startswith("dropped/") and k != _EVICTED)
                ),
                "evicted_blocks": int(delta.get(_EVICTED, 0)),
                "counters": delta,
                **_check(s, samples),
            }
        return out
    finally:
        for s in systems:
            s.stop()
        publisher.stop()


def _check(system: _System, samples: Sequence[PrefixSample]) -> dict[str, Any]:
    """Ask `system` for every sampled prompt; count answers that differ from the truth."""
    result: dict[str, Any] = {"stored_ok": 0, "stored": 0, "removed_ok": 0, "removed": 0}
    wrong: list[dict[str, Any]] = []
    for sample in samples:
        got = system.matched_blocks(sample.token_ids)
        ok = got == sample.expected_blocks
        result[sample.kind] += 1
        result[f"{sample.kind}_ok"] += ok
        if not ok:
            wrong.append(
                {
                    "kind": sample.kind,
                    "expected_blocks": sample.expected_blocks,
                    "got_blocks": got,
                    "prompt_blocks": sample.full_blocks,
                }
            )
    result["mismatches"] = len(wrong)
    result["mismatched"] = wrong[:10]
    return result


# --- the whole comparison ------------------------------------------------------------------------


def run(
    size: str = "smoke",
    out_dir: Path = DEFAULT_OUT_DIR,
    *,
    vs: str | None = "dynamo",
    events: int | None = None,
    per_message: Sequence[int] = PER_MESSAGE,
    peers_venv: Path | None = None,
    chart: bool = True,
    repeats: int = 1,
) -> dict[str, Any]:
    """Run the side-by-side ingest comparison (kvroute alone with `vs=None`); print the table,
    save out_dir/ingest_vs_<peer>.json and .png, return the data. PeerMissing when the peer is
    not installed (checked before anything runs)."""
    if vs not in (None, "dynamo"):
        raise ValueError(f"vs: expected 'dynamo' or None, got {vs!r}")
    if size not in SIZES:
        raise ValueError(f"size: expected one of {sorted(SIZES)}, got {size!r}")
    peer = find_dynamo(peers_venv) if vs == "dynamo" else None
    n = SIZES[size] if events is None else events
    if n < 1:
        raise ValueError(f"events: expected >= 1, got {n}")
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    workload = ChainedWorkload(
        blocks_per_store=BLOCKS_PER_STORE, block_size=BLOCK_SIZE, remove_share=REMOVE_SHARE
    )
    started = time.monotonic()
    encoded = encode_events(workload, n)
    samples = workload.samples(STORED_SAMPLES, REMOVED_SAMPLES)
    print(
        f"ingest --vs {vs or 'none'}: {n:,} events ({workload.stores:,} stores of "
        f"{BLOCKS_PER_STORE} blocks, {workload.removes:,} removals, "
        f"{workload.blocks_held:,} blocks held at the end), generated in "
        f"{time.monotonic() - started:.0f} s",
        flush=True,
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="kvroute-ingest-vs-") as tmp:
        for k in per_message:
            workdir = Path(tmp) / f"per-{k}"
            workdir.mkdir()
            print(f"  {k} events per message …", flush=True)
            tries = []
            for i in range(repeats):
                (workdir / f"run-{i}").mkdir()
                tries.append(_run_one(k, encoded, samples, peer, workdir / f"run-{i}"))
            runs.append(_median_run(tries))
    result: dict[str, Any] = {
        "size": size,
        "vs": vs,
        "events": n,
        "workload": {
            "blocks_per_store": BLOCKS_PER_STORE,
            "block_size": BLOCK_SIZE,
            "remove_share": REMOVE_SHARE,
            "stores": workload.stores,
            "removes": workload.removes,
            "blocks_stored": workload.blocks_stored,
            "blocks_held_at_end": workload.blocks_held,
            "shape": "vLLM 0.33.0 map events",
            "samples": {"stored": STORED_SAMPLES, "removed": REMOVED_SAMPLES},
        },
        "systems": {
            "kvroute": {
                "command": "kvroute serve (one engine)",
                "version": __version__,
                "index_impl": _index_impl(),
                "env": {
                    **{k: v for k, v in os.environ.items() if k.startswith("KVROUTE_")},
                    **_KVROUTE_ENV,
                },
            },
            **(
                {
                    "dynamo": {
                        "command": "python -m dynamo.indexer --threads 1",
                        "package": f"ai-dynamo-runtime=={peer.version}",
                    }
                }
                if peer is not None
                else {}
            ),
        },
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count()},
        "runs": runs,
    }
    name = f"ingest_vs_{vs or 'none'}"
    print_table(
        f"ingest side by side: {n:,} events, same publisher and stream; kvroute serve "
        f"({result['systems']['kvroute']['index_impl']} index, ingest budgets off)"
        + (f", dynamo.indexer --threads 1 ({peer.version})" if peer is not None else "")
        + f"; {_cpu_model()}, {os.cpu_count()} cores"
        + ("; target: kvroute ≥ 2× dynamo" if peer is not None else ""),
        COLUMNS,
        result_rows(result),
    )
    path = save_json(name, result, out_dir)
    print(f"wrote {path}")
    if chart:
        try:
            png = _chart(result, out_dir / f"{name}.png")
        except ImportError:
            print("no chart: matplotlib is not installed (pip install 'kvroute[bench]')")
        else:
            print(f"wrote {png}")
    return result


COLUMNS: Final = (
    "events/msg",
    "system",
    "events/s",
    "vs dynamo",
    "CPU s",
    "cores",
    "events/CPU-s",
    "vs dynamo per CPU-s",
    "RSS MB",
    "applied",
    "dropped",
    "evicted blocks",
    "stored ok",
    "removed ok",
    "mismatches",
)


def result_rows(result: dict[str, Any]) -> list[list[Any]]:
    """The table's rows: one per (events per message, system)."""
    rows: list[list[Any]] = []
    for r in result["runs"]:
        systems = r["systems"]
        dynamo = systems.get("dynamo")
        publisher_s = r.get("publisher_seconds")
        if publisher_s:  # the pace nobody can beat: when a system matches it, it waited
            rows.append(
                [r["events_per_message"], "(publisher)", r["events"] / publisher_s]
                + ["-"] * (len(COLUMNS) - 3)
            )
        for name, s in systems.items():
            ratio: Any = "-"
            cpu_ratio: Any = "-"
            if name != "dynamo" and dynamo and dynamo["events_per_s"] > 0:
                ratio = f"{s['events_per_s'] / dynamo['events_per_s']:.2f}×"
            if name != "dynamo" and dynamo and dynamo["events_per_cpu_s"] > 0:
                cpu_ratio = f"{s['events_per_cpu_s'] / dynamo['events_per_cpu_s']:.2f}×"
            rows.append(
                [
                    r["events_per_message"],
                    name if s["complete"] else f"{name} (incomplete)",
                    s["events_per_s"],
                    ratio,
                    s["cpu_seconds"],
                    s["cores"],
                    s["events_per_cpu_s"],
                    cpu_ratio,
                    s["rss_mb"],
                    s["applied"],
                    s["dropped"],
                    s.get("evicted_blocks", 0),
                    f"{s['stored_ok']}/{s['stored']}",
                    f"{s['removed_ok']}/{s['removed']}",
                    s["mismatches"],
                ]
            )
    return rows


def _chart(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names = list(runs[0]["systems"]) if runs else []
    labels = [str(r["events_per_message"]) for r in runs]
    colors = {"kvroute": "#2a9d8f", "dynamo": "#8d99ae"}
    panels = (
        ("events/s", "events_per_s", 1.0),
        ("CPU seconds", "cpu_seconds", 1.0),
        ("RSS after the run (MB)", "rss_mb", 1.0),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 4))
    width = 0.8 / max(1, len(names))
    for ax, (title, key, scale) in zip(axes, panels, strict=True):
        for i, name in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(runs))]
            ys = [r["systems"][name][key] * scale for r in runs]
            ax.bar(xs, ys, width, label=name, color=colors.get(name))
        ax.set_xticks(list(range(len(runs))), labels)
        ax.set_xlabel("events per message")
        ax.set_title(title)
        ax.legend()
    dynamo = result["systems"].get("dynamo", {}).get("package", "")
    fig.suptitle(
        f"ingest side by side: {result['events']:,} events, kvroute serve"
        + (f" vs {dynamo} dynamo.indexer --threads 1" if dynamo else "")
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
