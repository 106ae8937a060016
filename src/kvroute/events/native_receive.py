"""Which receive loop a subscriber runs: `_recv.c` over the libzmq pyzmq loaded, when both are
there, else pyzmq's own calls; `KVROUTE_RECEIVE_IMPL` picks one (docs/design.md §8)."""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from functools import cache
from typing import Any, Literal, TypeAlias

from kvroute.errors import ConfigError

__all__ = ["Drain", "PauseTimer", "ReceiveImpl", "native_drain", "pause_timer", "receive_error"]

ReceiveImpl = Literal["auto", "native", "python"]
# drain(handle, limit, out) -> 0 (socket empty), 1 (limit reached) or -errno; appends
# (seq, payload) or None (a malformed message, skipped whole) per message.
Drain: TypeAlias = Callable[[int, int, list[Any]], int]

log = logging.getLogger(__name__)
_FUNCTIONS = (
    "zmq_msg_init",
    "zmq_msg_recv",
    "zmq_msg_close",
    "zmq_msg_data",
    "zmq_msg_size",
    "zmq_msg_more",
    "zmq_errno",
)


@cache
def _load() -> tuple[Drain | None, str | None]:
    try:
        from kvroute.events import _recv  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"the extension is not built ({exc})"
    try:
        import zmq.backend.cython._zmq as backend
    except ImportError as exc:
        return None, f"pyzmq has no Cython backend ({exc})"
    try:
        # The backend module is already loaded, so this dlopen returns its handle, and a lookup
        # through it finds the libzmq it links to (or holds, when built in): the one whose
        # sockets `Socket.underlying` points at. RTLD_NOLOAD: never a second copy.
        lib = ctypes.CDLL(backend.__file__, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        addresses = [ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in _FUNCTIONS]
    except (OSError, AttributeError) as exc:
        return None, f"libzmq's functions were not found through pyzmq ({exc})"
    _recv.bind(*addresses)
    drain: Drain = _recv.drain
    return drain, None


def receive_error() -> str | None:
    """Why the native receive loop cannot run here, or None when it can."""
    return _load()[1]


def native_drain(impl: ReceiveImpl) -> Drain | None:
    """The native drain `impl` stands for, None for pyzmq's calls; ConfigError if `native` is
    asked for but cannot run."""
    if impl == "python":
        return None
    drain, error = _load()
    if drain is None:
        if impl == "native":
            raise ConfigError(
                f"KVROUTE_RECEIVE_IMPL=native, but the native receive loop cannot run: {error}; "
                "reinstall kvroute with a C compiler present (`make venv`), or set "
                "KVROUTE_RECEIVE_IMPL=python"
            )
        log.warning("events: the native receive loop cannot run (%s); using pyzmq's", error)
    return drain


class PauseTimer:
    """A one-shot timer on its own descriptor (a Linux timerfd, `_recv.c`), for an event loop
    to watch with `add_reader`: it fires within microseconds of its time, where asyncio's
    `call_later` rounds a wait up to whole milliseconds."""

    __slots__ = ("_ack", "_arm", "fd")

    def __init__(self, native: Any) -> None:
        self.fd: int = native.timer_new()
        self._arm = native.timer_arm
        self._ack = native.timer_ack

    def arm(self, seconds: float) -> None:
        self._arm(self.fd, int(seconds * 1e9))

    def ack(self) -> int:
        """Expirations since the last ack (0: it has not fired): clears the descriptor."""
        return int(self._ack(self.fd))

    def close(self) -> None:
        os.close(self.fd)


def pause_timer() -> PauseTimer | None:
    """A new `PauseTimer`, or None where the extension has none (not Linux, not built)."""
    try:
        from kvroute.events import _recv  # type: ignore[attr-defined]
    except ImportError:
        return None
    return PauseTimer(_recv) if hasattr(_recv, "timer_new") else None
