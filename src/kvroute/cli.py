"""The `kvroute` command line: assembles each package's subcommands; holds no logic."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

# Each module exposes `register(subparsers)`, adding its subcommand(s) with
# `set_defaults(func=...)`; `func(args) -> int` is the exit code.
_COMMAND_MODULES = (
    "kvroute.events.cli",
    "kvroute.sim.cli",
    "kvroute.gateway.cli",
    "kvroute.bench.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvroute", description="KV-cache-aware router for vLLM fleets."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
