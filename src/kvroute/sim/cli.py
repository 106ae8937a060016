"""The `kvroute sim` subcommand(s)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    """Placeholder until this package's command lands."""
    del sub


def _unused(args: argparse.Namespace) -> int:  # pragma: no cover
    return 2
