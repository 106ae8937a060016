"""The `kvroute bench` and `kvroute demo` subcommands: argument parsing only."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from kvroute.bench.report import DEFAULT_OUT_DIR

__all__ = ["register"]

# bench name -> module exposing run(size, out_dir) -> dict
_BENCHES = {
    "decode": "kvroute.bench.decode_bench",
    "index": "kvroute.bench.index_bench",
    "ingest": "kvroute.bench.ingest_bench",
}
# `kvroute bench match` is the match-latency part of the index benchmark.
_ALIASES = {
    "match": ("kvroute.bench.index_bench", "run_match"),
    "apply": ("kvroute.bench.index_bench", "run_apply"),
    "memory": ("kvroute.bench.index_bench", "run_memory"),
    "stalls": ("kvroute.bench.index_bench", "run_stalls"),
    "ingest-latency": ("kvroute.bench.ingest_bench", "run_latency"),
}
# Not in `bench all`: benches that start other processes.
_SEPARATE = {"relay": ("kvroute.bench.relay_bench", "run")}
# Not in `bench all` either: `options(args)` (ValueError: exit 2), then `run(options)`.
_WITH_OPTIONS = {
    "flood": "kvroute.bench.flood",
    "hostile-client": "kvroute.bench.hostile_client",
    "latency": "kvroute.bench.added_latency",
}


def register(sub: Any) -> None:
    bench = sub.add_parser(
        "bench", help="run benchmarks (tables on stdout, JSON in bench-results/)"
    )
    bench.add_argument(
        "which",
        choices=[
            *_BENCHES,
            *_ALIASES,
            "all",
            "replicas",
            "restart",
            "flood",
            "hostile-client",
            "trace",
            "latency",
            *_SEPARATE,
        ],
        help="decode | index (apply+memory+match+stalls) | apply | memory | match | stalls | "
        "ingest | ingest-latency (its fixed-rate latency part alone) | all | replicas (one "
        "gateway vs several behind a round-robin client; not in all) | restart (a gateway killed "
        "under load, restarted warm from its snapshot and cold; not in all) | flood (honest "
        "routing beside a hostile publisher, ingest limits on and off; not in all) | "
        "hostile-client (normal requests beside huge prompts and bodies, idle and slow "
        "connections; not in all) | relay (event latency and throughput direct vs through "
        "kvroute relay with CURVE; not in all) | trace FILE (a Mooncake-format request trace "
        "replayed once per policy on simulated fleets; not in all) | latency (the router's own "
        "added latency per policy and tokenizer mode; not in all)",
    )
    bench.add_argument(
        "file",
        nargs="?",
        type=Path,
        metavar="FILE",
        help="the trace of `kvroute bench trace` (default: none; the other benchmarks take none)",
    )
    bench.add_argument(
        "--size",
        choices=["smoke", "full"],
        default="full",
        help="workload of decode, index, ingest and relay: smoke (a quick check) or full",
    )
    bench.add_argument(
        "--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where the JSON results go"
    )
    peers = bench.add_argument_group(
        "side by side (kvroute bench ingest --vs dynamo, kvroute bench trace FILE --vs "
        "vllm-router; install the peers: make bench-peers)"
    )
    peers.add_argument(
        "--vs",
        choices=["dynamo", "vllm-router"],
        help="ingest: also run NVIDIA Dynamo's standalone indexer on the same stream and compare; "
        "trace: also replay the trace through vllm-router's kv_aware and cache_aware policies on "
        "the same simulated fleets (default: kvroute alone)",
    )
    peers.add_argument(
        "--events",
        type=int,
        metavar="N",
        help="events in the workload (default: 20,000 smoke, 500,000 full)",
    )
    peers.add_argument(
        "--per-message",
        metavar="LIST",
        help="events per message, one run each (default: 1,10,50)",
    )
    peers.add_argument(
        "--repeats",
        type=int,
        metavar="N",
        help="runs per setting; each system's median by events per CPU-second (default 1)",
    )
    peers.add_argument(
        "--peers-venv",
        type=Path,
        metavar="DIR",
        help="the venv holding ai-dynamo-runtime and vllm-router (default: .venv-peers)",
    )
    from kvroute.bench import replicas

    replicas.add_arguments(
        bench.add_argument_group(
            "several replicas (kvroute bench replicas; README 'Several replicas')"
        )
    )
    from kvroute.bench import restart

    restart.add_arguments(
        bench.add_argument_group("warm restarts (kvroute bench restart; README 'Persistence')")
    )
    from kvroute.bench import flood

    flood.add_arguments(
        bench.add_argument_group("a hostile publisher (kvroute bench flood; README 'Limits')")
    )
    from kvroute.bench import hostile_client

    hostile_client.add_arguments(
        bench.add_argument_group("hostile clients (kvroute bench hostile-client; README 'Limits')")
    )
    from kvroute.bench import trace

    trace.add_arguments(
        bench.add_argument_group(
            "production traces (kvroute bench trace FILE; README 'Trace replay')"
        )
    )
    from kvroute.bench import added_latency

    added_latency.add_arguments(
        bench.add_argument_group(
            "router latency (kvroute bench latency [--vs vllm-router]; README 'Router latency')"
        )
    )
    bench.set_defaults(func=_run_bench)

    demo = sub.add_parser(
        "demo", help="simulated fleet + router + chat workload: KV-aware vs. other policies"
    )
    try:
        demo_module = importlib.import_module("kvroute.bench.demo")
    except ImportError:
        demo_module = None
    add_arguments = getattr(demo_module, "add_demo_arguments", None)
    if add_arguments is not None:
        add_arguments(demo)
    demo.set_defaults(func=_run_demo)


def _run_bench(args: argparse.Namespace) -> int:
    if args.which == "trace":
        from kvroute.bench import trace

        code: int = trace.run(args)
        return code
    if args.file is not None:
        print(f"kvroute bench {args.which}: takes no FILE (only trace does)", file=sys.stderr)
        return 2
    if args.which == "replicas":
        from kvroute.bench import replicas

        replicas_code: int = replicas.run(args)
        return replicas_code
    if args.which == "restart":
        from kvroute.bench import restart

        restart.run(restart.options(args))
        return 0
    if args.which in _WITH_OPTIONS:
        module = importlib.import_module(_WITH_OPTIONS[args.which])
        try:
            opts = module.options(args)
        except ValueError as exc:
            print(f"kvroute bench {args.which}: {exc}", file=sys.stderr)
            return 2
        module.run(opts)
        return 0
    if args.vs is not None:
        return _run_vs(args)
    if any(v is not None for v in (args.events, args.per_message, args.peers_venv, args.repeats)):
        print(
            "kvroute bench: --events, --per-message, --repeats and --peers-venv go with "
            "ingest --vs",
            file=sys.stderr,
        )
        return 2
    if args.which == "all":
        targets = [(module, "run") for module in _BENCHES.values()]
    elif args.which in _ALIASES:
        targets = [_ALIASES[args.which]]
    elif args.which in _SEPARATE:
        targets = [_SEPARATE[args.which]]
    else:
        targets = [(_BENCHES[args.which], "run")]
    for module_name, func_name in targets:
        func = getattr(importlib.import_module(module_name), func_name)
        func(size=args.size, out_dir=args.out_dir)
    if args.which == "all":
        return _run_all_vs(args)
    return 0


def _run_all_vs(args: argparse.Namespace) -> int:
    """`bench all` (`make bench`) ends with the comparison against Dynamo when its venv is
    there, so the ingest target (2x Dynamo) is printed next to its baseline; else one hint."""
    from kvroute.bench import ingest_vs

    try:
        ingest_vs.find_dynamo(None)
    except ingest_vs.PeerMissing:
        print("kvroute bench all: no Dynamo peer; `make bench-peers` adds the side-by-side run")
        return 0
    try:
        ingest_vs.run(args.size, args.out_dir, vs="dynamo")
    except RuntimeError as exc:
        print(f"kvroute bench all: ingest --vs dynamo: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_vs(args: argparse.Namespace) -> int:
    from kvroute.bench import ingest_vs

    prog = f"kvroute bench {args.which} --vs {args.vs}"
    if args.vs == "vllm-router":
        print(
            f"{prog}: --vs vllm-router goes with trace (kvroute bench trace FILE)", file=sys.stderr
        )
        return 2
    if args.which != "ingest":
        print(f"{prog}: --vs compares ingest only (kvroute bench ingest --vs ...)", file=sys.stderr)
        return 2
    try:
        per_message = (
            ingest_vs.PER_MESSAGE
            if args.per_message is None
            else ingest_vs.parse_per_message(args.per_message)
        )
        if args.events is not None and args.events < 1:
            raise ValueError(f"--events: expected >= 1, got {args.events}")
        ingest_vs.find_dynamo(args.peers_venv)
    except (ValueError, ingest_vs.PeerMissing) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    try:
        ingest_vs.run(
            args.size,
            args.out_dir,
            vs=args.vs,
            events=args.events,
            per_message=per_message,
            peers_venv=args.peers_venv,
            repeats=args.repeats or 1,
        )
    except RuntimeError as exc:  # a system did not start or answer: say which, no traceback
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from kvroute.bench.demo import run_demo

    code: int = run_demo(args)
    return code
