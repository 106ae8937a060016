"""Which index runs: the compiled core (`native_index.py`) when built, else the pure-Python
reference (`prefix_index.py`); `KVROUTE_INDEX_IMPL` picks one (docs/design.md §12)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

from kvroute.core import EventCounters
from kvroute.errors import ConfigError
from kvroute.index.limits import IndexLimits
from kvroute.index.prefix_index import PrefixIndex

__all__ = ["IndexImpl", "create_index", "native_error", "resolve_impl"]

IndexImpl = Literal["auto", "native", "python"]

log = logging.getLogger(__name__)
_warned = False


def native_error() -> str | None:
    """Why the native core cannot be imported, or None when it can."""
    try:
        import kvroute.index.native_index  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def resolve_impl(impl: IndexImpl) -> Literal["native", "python"]:
    """The implementation `impl` stands for here; ConfigError if `native` is asked but absent."""
    global _warned
    if impl == "python":
        return "python"
    error = native_error()
    if error is None:
        return "native"
    if impl == "native":
        raise ConfigError(
            f"KVROUTE_INDEX_IMPL=native, but the native index core is not built ({error}); "
            "reinstall kvroute with a C compiler present (`make venv`), or set "
            "KVROUTE_INDEX_IMPL=python"
        )
    if not _warned:
        _warned = True
        log.warning(
            "index: the native core is not built (%s); running the pure-Python index", error
        )
    return "python"


def create_index(
    limits: IndexLimits | None = None,
    *,
    counters: EventCounters | None = None,
    clock: Callable[[], float] = time.monotonic,
    impl: IndexImpl = "auto",
) -> PrefixIndex:
    """A new, empty index of the implementation `impl` resolves to."""
    if resolve_impl(impl) == "native":
        from kvroute.index.native_index import NativePrefixIndex

        return NativePrefixIndex(limits, counters=counters, clock=clock)
    return PrefixIndex(limits, counters=counters, clock=clock)
