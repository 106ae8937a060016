"""Warm restarts against a simulated fleet (issue 13): a gateway that stops writes its snapshot;
the next one restores it unconfirmed, keeps what each engine confirms, and never brings back
the blocks of an engine that restarted while no gateway ran."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import httpx

from kvroute.core import SourceId, source_id
from kvroute.gateway import BackgroundServer, Gateway, create_app
from kvroute.metrics import Metrics
from kvroute.persist.index_snapshot import load_sources
from kvroute.settings import load_settings
from kvroute.sim import SimConfig, SimFleet
from tests.polling import eventually

MODEL = "sim-model"


def _engine_hashes(pairs: bytes) -> set[int]:
    return {struct.unpack_from("<Q", pairs, i)[0] for i in range(0, len(pairs), 16)}


def _gateway(app: Any) -> Gateway:
    gateway: Gateway = app.state.gateway
    return gateway


async def _caught_up(gateway: Gateway, fleet: SimFleet) -> None:
    """Every source has applied its engine's last published seq."""

    def done() -> bool:
        assert gateway.subscribers is not None
        last = {s.source: s.last_seq for s in gateway.subscribers.status()}
        return all(
            last.get(source_id(e.name, 0)) == e.state()["ranks"][0]["seq"] for e in fleet.engines
        )

    await eventually(done, "every source caught up with its engine")


def _claimed_but_not_cached(gateway: Gateway, fleet: SimFleet, sid: SourceId) -> set[int]:
    assert gateway.index is not None
    export = gateway.index.export_source(sid)
    assert export is not None
    engine = fleet.engine(sid.rpartition("/")[0])
    cached = {int(b["hash"]) for b in engine.state()["ranks"][0]["cached"]}
    return _engine_hashes(export.pairs) - cached


async def test_a_warm_restart_keeps_confirmed_blocks_and_drops_a_restarted_engines(
    tmp_path: Path,
) -> None:
    async with SimFleet(2, MODEL, config=SimConfig(speed=20.0)) as fleet:
        fleet_file = tmp_path / "fleet.yaml"
        fleet.write_fleet_file(fleet_file)
        snap = tmp_path / "index.snap"
        settings = load_settings(
            fleet_file=fleet_file,
            port=0,
            policy="round_robin",  # both engines get prompts
            health_interval_s=0.2,
            log_level="warning",
            snapshot_path=snap,
            snapshot_interval_s=0,
        )
        kept, restarted = (e.name for e in fleet.engines)
        app = create_app(settings, metrics=Metrics())
        async with (
            BackgroundServer(app) as server,
            httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=30) as http,
        ):
            for i in range(8):
                prompt = f"document {i} " + "shared words of a long prompt " * 20
                response = await http.post(
                    "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2}
                )
                assert response.status_code == 200, response.text
            await _caught_up(_gateway(app), fleet)
            index = _gateway(app).index
            assert index is not None
            before = {e.name: index.source_block_count(source_id(e.name, 0)) for e in fleet.engines}
            assert all(before.values()), before
        # Shutdown wrote the snapshot; the engine `restarted` restarts while no gateway runs.
        restored = {r.source: r for r in load_sources(snap, fleet="default")}
        assert {s: r.export.blocks for s, r in restored.items()} == {
            source_id(name, 0): n for name, n in before.items()
        }
        await fleet.restart_engine(restarted)

        metrics = Metrics()
        app = create_app(settings, metrics=metrics)
        async with (
            BackgroundServer(app) as server,
            httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=30) as http,
        ):

            async def ready() -> bool:
                return (await http.get("/readyz")).status_code == 200

            await eventually(ready, "the restarted gateway ready")
            gateway = _gateway(app)
            assert gateway.subscribers is not None and not gateway.subscribers.unconfirmed()
            index = gateway.index
            assert index is not None
            kept_sid, restarted_sid = source_id(kept, 0), source_id(restarted, 0)
            # The engine that kept running confirmed its blocks: routable at once, all of them.
            assert not index.is_stale(kept_sid)
            assert index.source_block_count(kept_sid) == before[kept]
            # The restarted one could not: nothing it held before comes back.
            old = _engine_hashes(restored[restarted_sid].export.pairs)
            export = index.export_source(restarted_sid)
            assert export is not None and not _engine_hashes(export.pairs) & old
            await _caught_up(gateway, fleet)
            for sid in (kept_sid, restarted_sid):
                assert _claimed_but_not_cached(gateway, fleet, sid) == set(), sid
            text = (await http.get("/metrics")).text
            assert (
                f'kvroute_source_resets_total{{cause="unconfirmed",source="{restarted_sid}"}} 1.0'
                in text
            ), text
            assert "kvroute_snapshot_unconfirmed_sources 0.0" in text


async def test_a_damaged_snapshot_is_refused_counted_and_the_gateway_starts_cold(
    tmp_path: Path,
) -> None:
    async with SimFleet(1, MODEL, config=SimConfig(speed=20.0)) as fleet:
        fleet_file = tmp_path / "fleet.yaml"
        fleet.write_fleet_file(fleet_file)
        snap = tmp_path / "index.snap"
        snap.write_bytes(b"KVRSNAP\0" + bytes(200))  # right magic, nothing else right
        settings = load_settings(
            fleet_file=fleet_file, port=0, log_level="warning", snapshot_path=snap
        )
        app = create_app(settings, metrics=Metrics())
        async with (
            BackgroundServer(app) as server,
            httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=30) as http,
        ):

            async def ready() -> bool:
                return (await http.get("/readyz")).status_code == 200

            await eventually(ready, "the gateway ready, cold")
            text = (await http.get("/metrics")).text
            assert 'kvroute_snapshot_refused_total{reason="corrupt"} 1.0' in text, text
            assert _gateway(app).restores == {}
