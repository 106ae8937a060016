"""The live stream through the relay: every message of the engine's PUB, frames unchanged
(never decoded), out of the relay's CURVE PUB."""

from __future__ import annotations

from typing import Any, Final

import zmq
import zmq.asyncio

from kvroute.relay.counters import RelayCounters

__all__ = ["LiveForwarder"]

_NOBLOCK: Final = int(zmq.NOBLOCK)
_SNDMORE: Final = int(zmq.SNDMORE)
_MAX_DRAIN: Final = 256  # messages per wake-up before the loop gets a turn


class LiveForwarder:
    """Moves messages from `sub` to `pub` until cancelled; `pub` may be swapped or unset (None:
    the relay's PUB is closed while the engine is away, and what arrives is dropped, counted).

    Waits on `sub` once per wake-up, then moves what is queued with non-blocking calls, frame by
    frame (a frame says whether another follows), so a message of any shape leaves as it came.
    PUB drops at its high-water mark, as the engine's does.
    """

    def __init__(self, sub: zmq.asyncio.Socket, counters: RelayCounters) -> None:
        self.sub = sub
        self.pub: zmq.Socket[Any] | None = None
        self._counters = counters

    async def run(self) -> None:
        raw: zmq.Socket[Any] = zmq.Socket.shadow(self.sub.underlying)
        recv = raw.recv
        counters = self._counters
        while True:
            await self.sub.poll()  # until readable
            pub = self.pub
            for _ in range(_MAX_DRAIN):
                try:
                    frame = recv(_NOBLOCK, copy=False)
                except zmq.Again:
                    break
                size = len(frame)
                if pub is None:
                    while frame.more:  # the parts of a message arrive together
                        frame = recv(_NOBLOCK, copy=False)
                    counters.unforwarded_messages += 1
                    continue
                send = pub.send
                while frame.more:
                    send(frame, _SNDMORE | _NOBLOCK, copy=False)
                    frame = recv(_NOBLOCK, copy=False)
                    size += len(frame)
                send(frame, _NOBLOCK, copy=False)
                counters.forwarded_messages += 1
                counters.forwarded_bytes += size
