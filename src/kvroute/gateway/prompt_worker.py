"""Parse, check and tokenize large request bodies in worker processes, so one large prompt never
holds the event loop (settings `prompt_offload_bytes`, `prompt_workers`; README "Limits")."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import struct
import sys
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from kvroute.errors import GatewayHTTPError, TokenizeError
from kvroute.gateway.openai_body import (
    RequestKind,
    RoutingRequest,
    check_prompt_length,
    parse_request,
)

__all__ = ["PreparedRequest", "PromptLimits", "PromptWorkers"]

log = logging.getLogger("kvroute.gateway")

# Frames on the worker's stdin/stdout: a 4-byte big-endian length, then that many bytes. A job is
# two frames (a pickled header, then the raw body, never pickled or copied), a result is one.
_LENGTH = struct.Struct(">I")
_NICE = 10  # the workers' scheduling priority, relative to the gateway's
_MAX_RESULT_BYTES = 1 << 31  # a result holds at most max_prompt_tokens ids twice: far below


@dataclass(frozen=True, slots=True)
class PromptLimits:
    """What a worker enforces before anything reaches the loop (settings of the same names)."""

    max_body_bytes: int
    max_json_depth: int
    max_prompt_tokens: int  # 0: no limit


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A parsed body, with the prompt's ids when a worker read or tokenized them (ids given,
    or a local tokenizer); `tokenize_error` says why a worker's tokenization failed (the
    request routes by load). From a worker the ids are an array('I'), and a prompt given as
    ids is not repeated in `request`: 10^6 Python ints cost the loop ~40 ms to unpickle."""

    request: RoutingRequest
    token_ids: Sequence[int] | None = None
    tokenize_error: str | None = None


# --- the worker process ----------------------------------------------------------------------


def _read_frame(stream: BinaryIO) -> bytes | None:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(head)
    data = stream.read(size)
    return data if len(data) == size else None


def _prepare(
    kind: RequestKind | None, raw: bytes, limits: PromptLimits, tokenizer: Any
) -> tuple[Any, ...]:
    """One job: ("ok", request without its body, ids or None, tokenize error or None) or
    ("error", status, message, param, code) for an answer the client gets as is."""
    try:
        req = parse_request(
            kind, raw, limits.max_body_bytes, limits.max_json_depth, limits.max_prompt_tokens
        )
        ids: Sequence[int] | None = None
        error: str | None = None
        if isinstance(req.prompt, list):
            ids = req.prompt  # the same list: pickled once
        elif tokenizer is not None:
            try:
                if req.kind is RequestKind.COMPLETION:
                    assert req.prompt is not None
                    ids = tokenizer.encode_prompt(req.prompt)
                else:
                    assert req.messages is not None
                    ids = tokenizer.encode_chat(
                        req.messages,
                        add_generation_prompt=req.add_generation_prompt,
                        chat_template_kwargs=req.chat_template_kwargs,
                    )
            except TokenizeError as exc:
                error = str(exc)
            if ids is not None:
                check_prompt_length(len(ids), limits.max_prompt_tokens)
        packed = None if ids is None else array("I", ids)
        prompt = None if isinstance(req.prompt, list) else req.prompt
        return ("ok", replace(req, raw=b"", prompt=prompt), packed, error)
    except GatewayHTTPError as exc:
        return ("error", exc.status, exc.message, exc.param, exc.code)


def worker_main() -> int:
    """The worker's loop: a config frame, then jobs until stdin closes."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print (a library's) must not break the result frames
    # Below the gateway's event loop: when cores are short, bulk parsing waits, routing not.
    with contextlib.suppress(OSError):
        os.nice(_NICE)
    config = _read_frame(stdin)
    if config is None:
        return 0
    tokenizer_json, chat_template, piece_cache_bytes = pickle.loads(config)
    tokenizer: Any = None
    if tokenizer_json is not None:
        from kvroute.tokenize.local import LocalTokenizer

        tokenizer = LocalTokenizer(
            Path(tokenizer_json), chat_template, piece_cache_bytes=piece_cache_bytes
        )
    while (header := _read_frame(stdin)) is not None and (raw := _read_frame(stdin)) is not None:
        kind, limits = pickle.loads(header)
        try:
            result = _prepare(kind, raw, limits, tokenizer)
        except Exception as exc:  # a bug, or a tokenizer failing oddly: the job fails, not us
            result = ("crash", f"{type(exc).__name__}: {exc}")
        out = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.write(_LENGTH.pack(len(out)) + out)
        stdout.flush()
    return 0


# --- the gateway's side ----------------------------------------------------------------------


class _Worker:
    """One worker process and the job it is running (one at a time)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        self.stdin: asyncio.StreamWriter = proc.stdin
        self.stdout: asyncio.StreamReader = proc.stdout

    async def run(self, header: bytes, raw: bytes) -> tuple[Any, ...]:
        self.stdin.write(_LENGTH.pack(len(header)) + header + _LENGTH.pack(len(raw)))
        self.stdin.write(raw)
        await self.stdin.drain()
        (size,) = _LENGTH.unpack(await self.stdout.readexactly(_LENGTH.size))
        if size > _MAX_RESULT_BYTES:
            raise RuntimeError(f"prompt worker: a result of {size} bytes")
        result: tuple[Any, ...] = pickle.loads(await self.stdout.readexactly(size))
        return result

    async def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.stdin.close()
            self.proc.kill()
        with contextlib.suppress(ProcessLookupError):
            await self.proc.wait()


class PromptWorkers:
    """Up to `workers` processes, started on first use, each running one job at a time; a job
    waits for a free one. A worker that dies fails its job with a 503 and is replaced."""

    def __init__(
        self,
        workers: int,
        limits: PromptLimits,
        *,
        tokenizer_json: Path | None = None,
        chat_template: str | None = None,
        piece_cache_bytes: int = 0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers: expected at least 1, got {workers}")
        self.limits = limits
        self._size = workers
        self._config = pickle.dumps(
            (
                None if tokenizer_json is None else str(tokenizer_json),
                chat_template,
                piece_cache_bytes,
            )
        )
        self._idle: deque[_Worker] = deque()
        self._started = 0
        self._free = asyncio.Condition()
        self._closed = False
        self.jobs = 0  # jobs answered, and workers replaced (read by the tests)
        self.restarts = 0

    async def prepare(self, kind: RequestKind | None, raw: bytes) -> PreparedRequest:
        """`raw` parsed and checked (and tokenized, with a local tokenizer) off the loop; the
        same GatewayHTTPError as an inline parse for a bad body."""
        worker = await self._acquire()
        header = pickle.dumps((kind, self.limits), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            result = await worker.run(header, raw)
        except BaseException as exc:
            # Dead, or its pipe now out of step (the client left mid-job): replace it.
            await self._discard(worker)
            if isinstance(exc, asyncio.IncompleteReadError | ConnectionError | RuntimeError):
                log.warning("prompt worker died; replaced", extra={"error": repr(exc)})
                raise GatewayHTTPError(
                    503, "prompt worker failed; retry the request", type="server_error"
                ) from exc
            raise
        await self._release(worker)
        self.jobs += 1
        if result[0] == "ok":
            _, req, ids, error = result
            return PreparedRequest(replace(req, raw=raw), ids, error)
        if result[0] == "error":
            _, status, message, param, code = result
            raise GatewayHTTPError(status, message, param=param, code=code)
        log.error("prompt worker failed a job", extra={"error": result[1]})
        raise GatewayHTTPError(500, f"internal error: {result[1]}", type="server_error")

    async def _acquire(self) -> _Worker:
        async with self._free:
            while not self._idle and self._started >= self._size:
                await self._free.wait()
            if self._closed:
                raise GatewayHTTPError(503, "gateway shutting down", type="server_error")
            if self._idle:
                return self._idle.popleft()
            self._started += 1
        try:
            return await self._spawn()
        except BaseException:
            async with self._free:
                self._started -= 1
                self._free.notify()
            raise

    async def _spawn(self) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import sys; from kvroute.gateway.prompt_worker import worker_main; "
            "sys.exit(worker_main())",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 20,
        )
        worker = _Worker(proc)
        worker.stdin.write(_LENGTH.pack(len(self._config)) + self._config)
        return worker

    async def _release(self, worker: _Worker) -> None:
        async with self._free:
            if self._closed:
                await worker.stop()
                return
            self._idle.append(worker)
            self._free.notify()

    async def _discard(self, worker: _Worker) -> None:
        await asyncio.shield(worker.stop())
        async with self._free:
            self._started -= 1
            self.restarts += 1
            self._free.notify()

    async def close(self) -> None:
        async with self._free:
            self._closed = True
            idle, self._idle = list(self._idle), deque()
            self._free.notify_all()
        for worker in idle:
            await worker.stop()
