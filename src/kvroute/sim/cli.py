"""The `kvroute sim` subcommand: N simulated engines in one process until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Any

from kvroute.errors import ConfigError
from kvroute.events.curve import load_curve_key_pair
from kvroute.sim.engine import SimConfig
from kvroute.sim.fleet import PORT_STRIDE, SimFleet
from kvroute.sim.server import apply_faults

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add `kvroute sim` to the `kvroute` subcommands."""
    d = SimConfig()
    p = sub.add_parser(
        "sim",
        help="run simulated vLLM engines (HTTP API + KV events) in one process",
        description=(
            "Start N simulated vLLM engines on 127.0.0.1. Engine i, DP rank r uses port "
            f"BASE + i*{PORT_STRIDE} + r for events and replay (HTTP: BASE + i*{PORT_STRIDE}); "
            "a base of 0 lets the system pick free ports. Runs until SIGINT/SIGTERM."
        ),
    )
    p.add_argument("--engines", type=int, default=2, help="number of engines")
    p.add_argument("--model", default="sim/llama-3.1-8b", help="served model name")
    p.add_argument("--dp-ranks", type=int, default=1, help="data-parallel ranks per engine")
    p.add_argument("--vllm-version", default=d.release, help="wire layout of this vLLM release")
    p.add_argument("--host", default="127.0.0.1", help="address the engines listen on")
    p.add_argument(
        "--http-base-port",
        type=int,
        default=0,
        metavar="BASE",
        help="HTTP port of engine 0; 0 picks free ports",
    )
    p.add_argument(
        "--events-base-port",
        type=int,
        default=0,
        metavar="BASE",
        help="KV-event PUB port of engine 0, rank 0; 0 picks free ports",
    )
    p.add_argument(
        "--replay-base-port",
        type=int,
        default=0,
        metavar="BASE",
        help="replay ROUTER port of engine 0, rank 0; 0 picks free ports",
    )
    p.add_argument("--no-replay", action="store_true", help="no replay ROUTER sockets")
    p.add_argument("--topic", default=d.topic, help="topic the events are published with")
    p.add_argument("--speed", type=float, default=d.speed, help="simulated seconds per wall second")
    p.add_argument(
        "--num-gpu-blocks", type=int, default=d.num_gpu_blocks, help="KV-cache blocks per DP rank"
    )
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV block")
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=d.max_num_seqs,
        help="requests a DP rank runs at once; more wait in its queue",
    )
    p.add_argument(
        "--prefill-tok-per-s",
        type=float,
        default=d.prefill_tok_per_s,
        help="prefill speed, prompt tokens per simulated second",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=0,
        help="prefill tokens a step computes at most, as vLLM V1 chunks prefills (default 0: "
        "each admitted prompt is prefilled whole in one step)",
    )
    p.add_argument(
        "--decode-step-ms",
        type=float,
        default=d.decode_step_s * 1000,
        help="simulated milliseconds per decode step (one token for each running request)",
    )
    p.add_argument("--bytes-hashes", action="store_true", help="32-byte hashes, not uint64")
    p.add_argument(
        "--buffer-steps",
        type=int,
        default=d.buffer_steps,
        help="batches each DP rank keeps for replay",
    )
    p.add_argument(
        "--lora",
        nargs="*",
        default=[],
        metavar="NAME",
        help="LoRA adapters served (default: none)",
    )
    p.add_argument(
        "--fleet-out",
        type=Path,
        metavar="FILE",
        help="write the fleet YAML here (default: print it on stdout)",
    )
    p.add_argument(
        "--curve-secret-key-file",
        type=Path,
        metavar="FILE",
        help="publish (PUB and replay ROUTER) as a CURVE server with this key pair (kvroute keys "
        "generate: the .key_secret file); the fleet YAML then carries its curve_server_key "
        "(default: no CURVE, plain ZeroMQ)",
    )
    # fault switches applied to every engine right after start-up
    p.add_argument(
        "--drop-next", type=int, default=0, metavar="N", help="fault: drop the next N batches"
    )
    p.add_argument("--duplicate-stores", action="store_true", help="fault: send stores twice")
    p.add_argument("--no-replay-server", action="store_true", help="fault: replay ROUTER off")
    p.add_argument("--pause-events", action="store_true", help="fault: queue, do not publish")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> SimConfig:
    if args.max_num_batched_tokens < 0:
        raise ValueError(
            f"--max-num-batched-tokens: expected >= 0, got {args.max_num_batched_tokens}"
        )
    curve = None
    if args.curve_secret_key_file is not None:
        try:
            curve = load_curve_key_pair(args.curve_secret_key_file, what="--curve-secret-key-file")
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
    return SimConfig(
        curve=curve,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        max_num_seqs=args.max_num_seqs,
        prefill_tok_per_s=args.prefill_tok_per_s,
        max_num_batched_tokens=args.max_num_batched_tokens or None,
        decode_step_s=args.decode_step_ms / 1000.0,
        speed=args.speed,
        release=args.vllm_version,
        bytes_hashes=args.bytes_hashes,
        topic=args.topic,
        buffer_steps=args.buffer_steps,
        replay=not args.no_replay,
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of `kvroute sim`; returns the exit code."""
    try:
        config = _config(args)
        fleet = SimFleet(
            args.engines,
            args.model,
            dp_ranks=args.dp_ranks,
            config=config,
            lora=args.lora,
            host=args.host,
            http_base_port=args.http_base_port,
            events_base_port=args.events_base_port,
            replay_base_port=args.replay_base_port,
        )
    except ValueError as exc:
        print(f"kvroute sim: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(fleet, args))


async def _serve(fleet: SimFleet, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    t = time.perf_counter()
    try:
        await fleet.start()
    except (OSError, ValueError) as exc:
        print(f"kvroute sim: start-up failed: {exc}", file=sys.stderr)
        return 1
    started = time.perf_counter() - t
    faults: dict[str, Any] = {}
    if args.drop_next:
        faults["drop_next"] = args.drop_next
    if args.duplicate_stores:
        faults["duplicate_stores"] = True
    if args.no_replay_server:
        faults["replay"] = "stop"
    if args.pause_events:
        faults["pause"] = True
    try:
        for engine in fleet.engines:
            if faults:
                await apply_faults(engine, faults)
        if args.fleet_out is not None:
            try:
                fleet.write_fleet_file(args.fleet_out)
            except OSError as exc:
                print(
                    f"kvroute sim: --fleet-out {args.fleet_out}: cannot write: "
                    f"{exc.strerror or exc}",
                    file=sys.stderr,
                )
                return 2
        print(
            f"kvroute sim: {len(fleet.engines)} engine(s) x {fleet.dp_ranks} rank(s) of "
            f"{fleet.model} ready in {started:.2f} s",
            file=sys.stderr,
        )
        for e in fleet.engines:
            print(f"  {e.name}  {e.url}  events {' '.join(e.events_endpoints)}", file=sys.stderr)
        if args.fleet_out is not None:
            print(f"  fleet file: {args.fleet_out}", file=sys.stderr)
        else:
            sys.stdout.write(fleet.fleet_yaml())
        sys.stdout.flush()
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await fleet.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0
