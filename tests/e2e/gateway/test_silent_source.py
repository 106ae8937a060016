"""A fleet whose `topic` differs from the engine's: the source connects, nothing ever arrives,
and kvroute says so (issue 15: this failed silently, routing by load only, with nothing logged
or counted). Real simulated engines, a real gateway on port 0."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from tests.polling import eventually
from tests.sim_gateway import MODEL, sim_gateway


def _wrong_topic(entries: list[dict[str, Any]]) -> None:
    entries[0]["topic"] = "not-the-engines-topic"


async def test_a_source_with_the_wrong_topic_is_flagged_silent_once_its_engine_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with sim_gateway(
        tmp_path,
        edit_fleet=_wrong_topic,
        policy="round_robin",  # both engines serve
        silent_source_s=1.0,
        health_interval_s=0.2,
        scrape_interval_s=1.0,
        log_level="warning",
    ) as gateway:
        http, fleet = gateway.http, gateway.fleet
        wrong, right = "engine-0", "engine-1"

        async def sources() -> dict[str, dict[str, Any]]:
            engines = (await http.get("/debug/engines")).json()["engines"]
            return {e["name"]: e["sources"][0] for e in engines}

        seed = 0

        async def flagged() -> bool:
            nonlocal seed
            seed += 1  # keep both engines serving until the verdict
            prompt = fleet.tokenizer.make_text(64, seed=f"silent-{seed}")
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
            response = await http.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            return bool((await sources())[wrong]["silent"])

        with caplog.at_level(logging.WARNING, logger="kvroute.gateway.silence"):
            await eventually(flagged, f"{wrong} flagged silent", timeout_s=30.0, interval_s=0.1)
        status = await sources()
        assert status[wrong]["connected"], status  # connected, yet nothing arrives
        assert status[wrong]["quiet_s"] >= 1.0
        assert not status[right]["silent"] and status[right]["quiet_s"] < 1.0, status
        metrics = (await http.get("/metrics")).text
        assert f'kvroute_source_silent{{source="{wrong}/0"}} 1.0' in metrics, metrics
        assert f'kvroute_source_silent{{source="{right}/0"}} 0.0' in metrics
        messages = [r.getMessage() for r in caplog.records if r.name == "kvroute.gateway.silence"]
        assert len(messages) == 1 and "topic" in messages[0], messages
        assert wrong in messages[0]
