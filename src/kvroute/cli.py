"""The `kvroute` command line: assembles each package's subcommands; holds no logic."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

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


class _HelpFormatter(argparse.HelpFormatter):
    """Ends the help of every option that takes a value with "(default: X)". A default of None
    or an empty one is not printed: the help text says in words what happens then."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        default = action.default
        if (
            text is None
            or text == argparse.SUPPRESS
            or "%(default)" in text
            or action.nargs == 0  # a flag: off unless given
            or default is None
            or default is argparse.SUPPRESS
            or (isinstance(default, str | list | tuple) and not default)
        ):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser with the help formatter above; the subparsers it makes are of this
    class too (argparse makes them of the parent's class), so every subcommand shows defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvroute", description="KV-cache-aware router for vLLM fleets.")
    parser.add_argument("--version", action="version", version=f"kvroute {__version__}")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", help="what to run; kvroute COMMAND -h: its options"
    )
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
