"""The `kvroute bench` and `kvroute demo` subcommands: argument parsing only."""

from __future__ import annotations

import argparse
import importlib
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
}


def register(sub: Any) -> None:
    bench = sub.add_parser(
        "bench", help="run benchmarks (tables on stdout, JSON in bench-results/)"
    )
    bench.add_argument(
        "which",
        choices=[*_BENCHES, *_ALIASES, "all"],
        help="decode | index (apply+memory+match) | apply | memory | match | ingest | all",
    )
    bench.add_argument("--size", choices=["smoke", "full"], default="full")
    bench.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
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
    if args.which == "all":
        targets = [(module, "run") for module in _BENCHES.values()]
    elif args.which in _ALIASES:
        targets = [_ALIASES[args.which]]
    else:
        targets = [(_BENCHES[args.which], "run")]
    for module_name, func_name in targets:
        func = getattr(importlib.import_module(module_name), func_name)
        func(size=args.size, out_dir=args.out_dir)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from kvroute.bench.demo import run_demo

    code: int = run_demo(args)
    return code
