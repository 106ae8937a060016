"""Gateway wiring without a server: what the settings switch on and off."""

from __future__ import annotations

import logging

import httpx
import pytest

from kvroute.gateway import Gateway
from kvroute.metrics import Metrics
from kvroute.settings import load_settings


async def test_kv_event_sync_disabled_degrades_kv_aware_to_least_loaded_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = load_settings(kv_event_sync_enabled=False)
    async with httpx.AsyncClient() as client:
        with caplog.at_level(logging.INFO, logger="kvroute"):
            gateway = Gateway(settings, client, Metrics(), [])
            await gateway.start()
            await gateway.close()
    assert (gateway.policy.name, gateway.index, gateway.subscribers) == ("least_loaded", None, None)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "KV event sync disabled: no subscribers, kv_aware routes as least_loaded"
    ]


@pytest.mark.parametrize("policy", ["round_robin", "random", "least_loaded"])
async def test_kv_event_sync_disabled_keeps_a_load_only_policy_silently(
    caplog: pytest.LogCaptureFixture, policy: str
) -> None:
    settings = load_settings(kv_event_sync_enabled=False, policy=policy)
    async with httpx.AsyncClient() as client:
        with caplog.at_level(logging.WARNING, logger="kvroute"):
            gateway = Gateway(settings, client, Metrics(), [])
    assert gateway.policy.name == policy and gateway.index is None
    assert not caplog.records


async def test_kv_event_sync_enabled_builds_the_index_and_subscribers() -> None:
    async with httpx.AsyncClient() as client:
        gateway = Gateway(load_settings(), client, Metrics(), [])
        try:
            assert gateway.policy.name == "kv_aware"
            assert gateway.index is not None and gateway.subscribers is not None
        finally:
            await gateway.close()
