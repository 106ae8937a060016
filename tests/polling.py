"""Polling with a deadline: how tests wait for something asynchronous (never a fixed sleep)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

DEADLINE_S = 10.0


async def eventually(
    check: Callable[[], bool | Awaitable[bool]],
    what: str,
    *,
    timeout_s: float = DEADLINE_S,
    interval_s: float = 0.02,
) -> None:
    """Poll `check` (plain or async) until it holds; AssertionError naming `what` after
    `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(interval_s)
