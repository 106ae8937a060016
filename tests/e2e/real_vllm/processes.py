"""Start and stop real vLLM engines and `kvroute serve` as child processes, with no leftovers."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CHILDREN: list[subprocess.Popen[bytes]] = []


def _kill_group(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait_s: float = 20
) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@atexit.register
def _kill_all() -> None:
    for proc in _CHILDREN:
        _kill_group(proc, signal.SIGKILL, 5)


def http_json(url: str, body: dict[str, Any] | None = None, *, timeout: float = 120) -> Any:
    data = None if body is None else json.dumps(body).encode()
    method = "GET" if body is None else "POST"
    req = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def http_ok(url: str, timeout: float = 2) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def port_is_free(port: int) -> bool:
    """True when `port` can be bound on all interfaces (as vLLM's `tcp://*:port` does)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `cmd` in its own process group, output to `log_path`, killed at exit at the latest."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    _CHILDREN.append(proc)
    return proc


def _wait_http_ok(
    proc: subprocess.Popen[bytes] | None, log_path: Path, url: str, timeout_s: float
) -> None:
    """Poll `url` until it answers 200; fail at once, with the log's tail, if `proc` exits."""

    def ready() -> bool:
        assert proc is not None
        if proc.poll() is not None:
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"{log_path.stem} exited with {proc.returncode}:\n{tail}")
        return http_ok(url)

    wait_until(ready, timeout_s, url)


@dataclass
class VllmEngine:
    """One real vLLM CPU engine serving the tiny model with KV events and replay on."""

    root: Path
    index: int
    http_port: int
    pub_port: int
    replay_port: int
    log_dir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    starts: int = 0

    @property
    def name(self) -> str:
        return f"vllm-{self.index}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        # A restart right after a kill: the old process group may still hold its sockets.
        ports = (self.http_port, self.pub_port, self.replay_port)
        wait_until(lambda: all(port_is_free(p) for p in ports), 30, f"{self.name}'s ports")
        env = dict(os.environ)
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env.update(
            TMPDIR=str(tmp),
            VLLM_TARGET_DEVICE="cpu",
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_CPU_OMP_THREADS_BIND=str(self.index % max(os.cpu_count() or 1, 1)),
            VLLM_CACHE_ROOT=str(self.root / "cache"),
            HF_HOME=str(self.root / "hf"),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            VLLM_SERVER_DEV_MODE="1",  # POST /reset_prefix_cache
        )
        kv_events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            # vLLM binds only when the endpoint has '*': tcp://127.0.0.1:N would connect.
            "endpoint": f"tcp://*:{self.pub_port}",
            "replay_endpoint": f"tcp://*:{self.replay_port}",
            "topic": "kv",
        }
        cmd = [
            str(self.root / "venv" / "bin" / "vllm"), "serve", str(self.root / "tiny-llama"),
            "--host", "127.0.0.1", "--port", str(self.http_port), "--served-model-name", "tiny",
            "--block-size", "32", "--max-model-len", "512", "--max-num-seqs", "4",
            "--num-gpu-blocks-override", "24", "--dtype", "bfloat16", "--enforce-eager",
            "--enable-prefix-caching", "--enable-prompt-tokens-details",
            "--kv-events-config", json.dumps(kv_events),
        ]  # fmt: skip
        self.starts += 1
        self.proc = _spawn(cmd, env, self.log_path)

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.{self.starts}.log"

    def wait_ready(self, timeout_s: float = 240) -> None:
        _wait_http_ok(self.proc, self.log_path, f"{self.url}/health", timeout_s)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            _kill_group(self.proc, sig)
            self.proc = None

    def complete(self, prompt: str, max_tokens: int = 4) -> dict[str, Any]:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        result: dict[str, Any] = http_json(f"{self.url}/v1/completions", body)
        return result

    def prompt_of_tokens(self, stem: str, n_tokens: int) -> str:
        """A prompt of about `n_tokens` tokens (at most), made of numbered words after `stem`."""
        words: list[str] = []
        while True:
            candidate = " ".join([stem, *words, f"{stem}{len(words)}"])
            if len(self.tokenize(candidate)) > n_tokens:
                return " ".join([stem, *words])
            words.append(f"{stem}{len(words)}")

    def tokenize(self, prompt: str) -> list[int]:
        tokens: list[int] = http_json(f"{self.url}/tokenize", {"model": "tiny", "prompt": prompt})[
            "tokens"
        ]
        return tokens


@dataclass
class KvrouteServer:
    """`kvroute serve` as a child process, the way an operator runs it."""

    fleet_file: Path
    port: int
    log_dir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = dict(os.environ)
        env.update(
            KVROUTE_LOG_LEVEL="info",
            AIBRIX_USE_REMOTE_TOKENIZER="true",
            KVROUTE_HEALTH_INTERVAL_S="0.5",
        )
        kvroute = Path(sys.executable).with_name("kvroute")
        cmd = [str(kvroute), "serve", "--fleet", str(self.fleet_file), "--port", str(self.port)]
        self.starts += 1
        self.proc = _spawn(cmd, env, self.log_path)

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"kvroute.{self.starts}.log"

    def wait_ready(self, timeout_s: float = 60) -> None:
        _wait_http_ok(self.proc, self.log_path, f"{self.url}/readyz", timeout_s)

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc = None

    def route(self, prompt: str) -> dict[str, Any]:
        result: dict[str, Any] = http_json(
            f"{self.url}/v1/route", {"model": "tiny", "prompt": prompt, "max_tokens": 4}
        )
        return result

    def blocks_by_engine(self, prompt: str) -> dict[str, int]:
        return {e["name"]: e["blocks_matched"] for e in self.route(prompt)["engines"]}

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels`."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, label_text = head.partition("{")
            if metric != name:
                continue
            if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                total += float(value)
        return total
