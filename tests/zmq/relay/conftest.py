"""Key pairs and a relay transport for the relay tests (real sockets on 127.0.0.1)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvroute.events import CurveKeyPair, load_curve_key_pair, write_curve_key_pair
from tests.event_harness import TRANSPORT, RelayTransport


@dataclass(frozen=True)
class Keys:
    """The relay's pair, an allow-listed gateway's, an unknown gateway's, and the allow dir."""

    relay: CurveKeyPair
    gateway: CurveKeyPair
    stranger: CurveKeyPair
    allow_dir: Path
    dir: Path


def _pair(directory: Path, name: str) -> CurveKeyPair:
    _, secret = write_curve_key_pair(directory, name)
    return load_curve_key_pair(secret)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    allow = tmp_path / "allow"
    allow.mkdir()
    secrets = tmp_path / "secrets"
    gateway_public, gateway_secret = write_curve_key_pair(secrets, "gateway")
    (allow / "gateway.key").write_bytes(gateway_public.read_bytes())
    return Keys(
        relay=_pair(secrets, "relay"),
        gateway=load_curve_key_pair(gateway_secret, gateway_public),
        stranger=_pair(secrets, "stranger"),
        allow_dir=allow,
        dir=secrets,
    )


@pytest.fixture
async def relayed(keys: Keys) -> AsyncIterator[RelayTransport]:
    """Every feed started in the test is published through a relay; stacks are CURVE clients."""
    transport = RelayTransport(keys.relay, keys.gateway, keys.allow_dir)
    TRANSPORT.append(transport)
    try:
        yield transport
    finally:
        TRANSPORT.remove(transport)
        await asyncio.wait_for(transport.close(), 10)
