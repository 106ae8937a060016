"""Replay through the relay: each request on the relay's CURVE ROUTER goes to the engine's replay
ROUTER over a DEALER of its own; the reply frames, end marker included, go back unchanged."""

from __future__ import annotations

import asyncio
import logging
from typing import Final

import zmq
import zmq.asyncio

from kvroute.relay.counters import RelayCounters, RelayReplayOutcome

__all__ = ["ReplayProxy"]

log = logging.getLogger("kvroute.relay")

_END_SEQ: Final = b"\xff" * 8


def _is_end(frames: list[bytes]) -> bool:
    """The engine's end-of-replay marker: seq -1 (or an empty payload), in either layout."""
    return len(frames) >= 2 and (frames[-2] == _END_SEQ or frames[-1] == b"")


class ReplayProxy:
    """Serves `router` (bound, CURVE server) until cancelled; at most `max_outstanding`
    requests run at once (more are refused: no reply, counted), each for at most `timeout_s`.

    A request must be what vLLM answers, `[identity, "", seq8]`; anything else gets no reply,
    as from vLLM. Replies are sent with ROUTER_MANDATORY: a client that left or stopped reading
    (its queue full) ends its request early, without an end marker, so it retries as after any
    lost reply; nothing is dropped silently in the middle of a replay.
    """

    def __init__(
        self,
        context: zmq.asyncio.Context,
        router: zmq.asyncio.Socket,
        engine_replay: str,
        counters: RelayCounters,
        *,
        max_outstanding: int,
        timeout_s: float,
    ) -> None:
        self._context = context
        self._router = router
        self._engine = engine_replay
        self._counters = counters
        self._max = max_outstanding
        self._timeout_s = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def outstanding(self) -> int:
        return len(self._tasks)

    async def run(self) -> None:
        try:
            while True:
                frames = await self._router.recv_multipart()
                if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                    self._counters.replays[RelayReplayOutcome.BAD_REQUEST] += 1
                    continue
                if len(self._tasks) >= self._max:
                    self._counters.replays[RelayReplayOutcome.REFUSED] += 1
                    continue
                task = asyncio.create_task(self._one(frames[0], frames[1:]))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)

    async def _one(self, identity: bytes, request: list[bytes]) -> None:
        outcome = await self._relay(identity, request)
        self._counters.replays[outcome] += 1
        if outcome is not RelayReplayOutcome.OK:
            log.info(
                "relay: replay ended early",
                extra={"outcome": outcome.value, "start": int.from_bytes(request[1], "big")},
            )

    async def _relay(self, identity: bytes, request: list[bytes]) -> RelayReplayOutcome:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        dealer = self._context.socket(zmq.DEALER)
        try:
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.RCVHWM, 0)  # the engine's ROUTER drops at its own HWM
            dealer.connect(self._engine)
            try:
                await asyncio.wait_for(dealer.send_multipart(request), self._timeout_s)
            except TimeoutError:
                return RelayReplayOutcome.TIMEOUT
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0 or not await dealer.poll(max(1, int(remaining * 1000))):
                    return RelayReplayOutcome.TIMEOUT
                frames = await dealer.recv_multipart(flags=zmq.NOBLOCK)
                try:
                    await self._router.send_multipart([identity, *frames], flags=zmq.NOBLOCK)
                except zmq.ZMQError:  # EHOSTUNREACH (gone) or EAGAIN (not reading)
                    return RelayReplayOutcome.CLIENT_GONE
                self._counters.replay_batches += 1
                if _is_end(frames):
                    return RelayReplayOutcome.OK
        finally:
            dealer.close(linger=0)
