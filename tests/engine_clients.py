"""The engine client and fleet as tests build them: short timeouts, loops off unless asked for."""

from __future__ import annotations

from typing import Any

import httpx

from kvroute.fleet import EngineSpec, Fleet
from kvroute.upstream import HttpxEngineClient


def engine_client(
    transport: httpx.AsyncBaseTransport | None = None, *, timeout_s: float = 5.0
) -> HttpxEngineClient:
    """The real httpx client; `transport` puts an in-process ASGI app in place of the network."""
    return HttpxEngineClient(
        connect_timeout_s=timeout_s,
        read_timeout_s=timeout_s,
        max_connections=10,
        transport=transport,
    )


def quiet_fleet(specs: list[EngineSpec], client: HttpxEngineClient, **knobs: Any) -> Fleet:
    """A fleet whose probe and scrape loops are off unless a test turns one on (it drives rounds
    itself); the fleet file, when given, is watched every 20 ms."""
    options: dict[str, Any] = {
        "health_interval_s": 0,
        "unhealthy_after": 3,
        "scrape_interval_s": 0,
        "watch_interval_s": 0.02,
        **knobs,
    }
    return Fleet(specs, client, **options)
