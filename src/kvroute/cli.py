"""The `kvroute` command line: assembles each package's subcommands; holds no logic."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from kvroute import __version__

__all__ = ["main"]

# Each module exposes `register(subparsers)`, adding its subcommand(s) with
# `set_defaults(func=...)`; `func(args) -> int` is the exit code.
_COMMAND_MODULES = (
    "kvroute.events.cli",
    "kvroute.sim.cli",
    "kvroute.gateway.cli",
    "kvroute.bench.cli",
    "kvroute.relay.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvroute", description="KV-cache-aware router for vLLM fleets."
    )
    parser.add_argument("--version", action="version", version=f"kvroute {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `kvroute`: what it can do, not an error
        parser.print_help()
        return 0
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
