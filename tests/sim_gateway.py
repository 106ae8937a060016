"""A real gateway (port 0) in front of simulated engines, for end-to-end tests: one async context
manager instead of a fixture per file."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from kvroute.gateway import BackgroundServer, create_app
from kvroute.metrics import Metrics
from kvroute.settings import load_settings
from kvroute.sim import SimConfig, SimFleet

MODEL = "sim-model"


@dataclass
class SimGateway:
    fleet: SimFleet
    url: str
    http: httpx.AsyncClient


@contextlib.asynccontextmanager
async def sim_gateway(
    tmp_path: Path,
    engines: int = 2,
    *,
    num_gpu_blocks: int = 512,
    edit_fleet: Callable[[list[dict[str, Any]]], None] | None = None,
    **settings: Any,
) -> AsyncIterator[SimGateway]:
    """`engines` simulated engines of MODEL and a gateway over their fleet file (`edit_fleet`
    may change its entries first); `settings` override the gateway's."""
    fleet = SimFleet(engines, MODEL, config=SimConfig(num_gpu_blocks=num_gpu_blocks, speed=20.0))
    await fleet.start()
    try:
        entries = fleet.fleet_entries()
        if edit_fleet is not None:
            edit_fleet(entries)
        fleet_file = tmp_path / "fleet.yaml"
        fleet_file.write_text(yaml.safe_dump({"engines": entries}))
        options: dict[str, Any] = {"fleet_file": fleet_file, "port": 0, **settings}
        server = BackgroundServer(create_app(load_settings(**options), metrics=Metrics()))
        url = await server.start()
        try:
            async with httpx.AsyncClient(base_url=url, timeout=30.0, trust_env=False) as http:
                yield SimGateway(fleet, url, http)
        finally:
            await server.stop()
    finally:
        await fleet.close()
