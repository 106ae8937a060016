"""The `kvroute events` subcommands: `decode` payload files, `listen` to a live engine source.
Output is JSON in the fixtures' normalised shape (expected.json); bytes hashes as {"hex": ...}."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq.asyncio

from kvroute.errors import KvrouteError, WireError
from kvroute.events.replay import request_replay
from kvroute.events.vllm_events import (
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEvent,
    VllmEventBatch,
)
from kvroute.events.wire import decode_vllm, parse_live_frames

__all__ = ["batch_to_json", "event_to_json", "register"]

_EXIT_OK = 0
_EXIT_BAD_INPUT = 2

# The keys of a normalised event, in expected.json's order (fixtures README).
_EVENT_KEYS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "lora_name",
    "medium",
    "group_idx",
    "extra_keys",
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def event_to_json(event: VllmEvent) -> dict[str, Any]:
    """One event with every normalised key (None where the type or release lacks it)."""
    out: dict[str, Any] = {"type": type(event).__name__.removeprefix("Vllm")}
    carries = isinstance(event, VllmBlockStored | VllmBlockRemoved)
    for key in _EVENT_KEYS:
        out[key] = _jsonable(getattr(event, key, None)) if carries else None
    return out


def batch_to_json(batch: VllmEventBatch) -> dict[str, Any]:
    """A batch in expected.json's scenario shape: ts, data_parallel_rank, events."""
    return {
        "ts": batch.ts,
        "data_parallel_rank": batch.data_parallel_rank,
        "events": [event_to_json(e) for e in batch.events],
    }


def register(sub: Any) -> None:
    """Add `kvroute events decode|listen` to the top-level subparsers."""
    events = sub.add_parser("events", help="decode vLLM KV-event payloads or listen to an engine")
    actions = events.add_subparsers(
        dest="events_command", required=True, metavar="ACTION", help="what to do"
    )

    decode = actions.add_parser(
        "decode", help="print each payload file (one KVEventBatch) as normalised JSON"
    )
    decode.add_argument(
        "files",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="a payload file: one KVEventBatch as vLLM publishes it (msgpack)",
    )
    decode.set_defaults(func=_quiet_on_broken_pipe(_run_decode))

    listen = actions.add_parser(
        "listen", help="subscribe to a PUB endpoint and print one JSON line per batch"
    )
    listen.add_argument("--endpoint", required=True, help="PUB endpoint, e.g. tcp://host:5557")
    listen.add_argument(
        "--replay-endpoint",
        help="replay ROUTER endpoint, e.g. tcp://host:5558 (default: none, no replay)",
    )
    listen.add_argument(
        "--topic", default="", help='topic prefix to subscribe to (default: "", every topic)'
    )
    listen.add_argument(
        "--from-seq",
        type=_seq,
        default=None,
        metavar="N",
        help="replay buffered batches from seq N first (needs --replay-endpoint), then go live "
        "(default: live batches only)",
    )
    listen.add_argument(
        "--replay-timeout", type=float, default=5.0, help="seconds allowed for the replay"
    )
    listen.set_defaults(func=_quiet_on_broken_pipe(_run_listen))


def _quiet_on_broken_pipe(
    run: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """`kvroute events ... | head` ends quietly (exit 0) when the reader goes away."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except BrokenPipeError:
            # Point stdout at devnull so the interpreter's final flush does not fail again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return _EXIT_OK

    return wrapped


def _seq(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a seq number >= 0, got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected a seq number >= 0, got {text!r}")
    return value


def _error(message: str) -> None:
    print(f"kvroute events: {message}", file=sys.stderr, flush=True)


# --- decode -----------------------------------------------------------------------------------


def _run_decode(args: argparse.Namespace) -> int:
    code = _EXIT_OK
    for path in args.files:
        try:
            payload = path.read_bytes()
        except OSError as exc:
            _error(f"{path}: cannot read ({exc.strerror or exc})")
            code = _EXIT_BAD_INPUT
            continue
        try:
            batch = decode_vllm(payload)
        except WireError as exc:
            _error(f"{path}: {exc}")
            code = _EXIT_BAD_INPUT
            continue
        print(json.dumps(batch_to_json(batch)), flush=True)
    return code


# --- listen -----------------------------------------------------------------------------------


def _run_listen(args: argparse.Namespace) -> int:
    if args.from_seq is not None and not args.replay_endpoint:
        _error("listen: --from-seq needs --replay-endpoint")
        return _EXIT_BAD_INPUT
    return asyncio.run(
        _listen(
            args.endpoint,
            replay_endpoint=args.replay_endpoint,
            topic=args.topic,
            from_seq=args.from_seq,
            replay_timeout_s=args.replay_timeout,
        )
    )


def _print_batch(seq: int, payload: bytes) -> None:
    try:
        batch = decode_vllm(payload)
    except WireError as exc:
        _error(f"seq {seq}: {exc}")
        return
    print(json.dumps({"seq": seq, **batch_to_json(batch)}), flush=True)


def _waiting(endpoint: str, topic: str) -> str:
    """What `listen` waits for, and why it may never come (one line on stderr)."""
    return (
        f"listen: waiting for batches from {endpoint} with topic {topic!r} (the engine must bind "
        f"it with endpoint tcp://*:PORT, publish with this topic and enable_kv_cache_events)"
    )


async def _listen(
    endpoint: str,
    *,
    replay_endpoint: str | None,
    topic: str,
    from_seq: int | None,
    replay_timeout_s: float,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    context = zmq.asyncio.Context()
    sub = context.socket(zmq.SUB)
    live: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    try:
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 0)
        sub.setsockopt(zmq.IPV6, 1)
        try:
            sub.connect(endpoint)
        except zmq.ZMQError as exc:
            _error(f"listen: --endpoint {endpoint!r}: {exc}")
            return _EXIT_BAD_INPUT
        sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        _error(_waiting(endpoint, topic))
        # Read live messages from the start so the ones that arrive during the replay are
        # buffered, then printed after it without duplicates.
        reader = asyncio.create_task(_read_live(sub, live))
        stopper = asyncio.create_task(stop.wait())
        try:
            newest = -1  # live messages with seq <= newest are duplicates of the replay
            if from_seq is not None and replay_endpoint is not None:
                newest = from_seq - 1
                replay = asyncio.create_task(
                    request_replay(context, replay_endpoint, from_seq, timeout_s=replay_timeout_s)
                )
                await asyncio.wait({replay, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if not replay.done():
                    replay.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await replay
                    return _EXIT_OK
                try:
                    result = replay.result()
                except KvrouteError as exc:
                    _error(f"listen: replay from {replay_endpoint}: {exc}")
                    return _EXIT_BAD_INPUT
                for seq, payload in result.batches:
                    if seq > newest:
                        _print_batch(seq, payload)
                        newest = seq
                if not result.complete:
                    _error(f"listen: replay from {replay_endpoint} incomplete (no end marker)")
            while not stop.is_set():
                getter = asyncio.create_task(live.get())
                await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter
                    break
                seq, payload = getter.result()
                if newest >= 0:
                    if seq <= newest:
                        continue
                    newest = -1  # past the replay: everything from here on is new
                _print_batch(seq, payload)
            return _EXIT_OK
        finally:
            for task in (reader, stopper):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        sub.close(linger=0)
        context.term()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _read_live(sub: zmq.asyncio.Socket, live: asyncio.Queue[tuple[int, bytes]]) -> None:
    while True:
        try:
            _topic, seq, payload = parse_live_frames(await sub.recv_multipart())
        except WireError as exc:
            _error(f"listen: {exc}")
            continue
        live.put_nowait((seq, payload))
