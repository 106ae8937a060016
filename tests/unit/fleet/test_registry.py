"""Fleet: health probes and ejection, in-flight load, scraping, models, and live membership changes.

Engines are a real in-process ASGI app (one per host name) reached by the real engine client
through httpx.ASGITransport.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from kvroute.errors import ConfigError
from kvroute.fleet import NUM_REQUESTS_RUNNING, EngineSpec, Fleet
from kvroute.upstream import HttpxEngineClient
from tests.engine_clients import engine_client, quiet_fleet
from tests.polling import eventually

DEADLINE_S = 10.0


@dataclass
class _Engines:
    """vLLM-shaped /health and /metrics for several engines, told apart by host name."""

    health: dict[str, int] = field(default_factory=dict)  # host -> status (default 200)
    metrics_status: dict[str, int] = field(default_factory=dict)  # host -> status (default 200)
    running: dict[str, float] = field(default_factory=dict)
    probes: dict[str, int] = field(default_factory=dict)
    never: asyncio.Event = field(default_factory=asyncio.Event)  # host "hung" waits on it

    async def health_route(self, request: Request) -> Response:
        host = request.url.hostname or ""
        self.probes[host] = self.probes.get(host, 0) + 1
        if host == "hung":
            await self.never.wait()
        return Response(status_code=self.health.get(host, 200))

    async def metrics_route(self, request: Request) -> Response:
        host = request.url.hostname or ""
        if host == "hung":
            await self.never.wait()
        if self.metrics_status.get(host, 200) != 200:
            return Response(status_code=self.metrics_status[host])
        if host == "broken":
            return PlainTextResponse("<html>not metrics { {</html>")
        running = self.running.get(host, 0.0)
        return PlainTextResponse(
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="m"}} {running}\n'
        )

    def app(self) -> Starlette:
        return Starlette(
            routes=[Route("/health", self.health_route), Route("/metrics", self.metrics_route)]
        )


def _spec(name: str, model: str = "llama", **kw: object) -> EngineSpec:
    return EngineSpec(name=name, model=model, url=f"http://{name}:8000", events=None, **kw)  # type: ignore[arg-type]


@pytest.fixture
def engines() -> _Engines:
    return _Engines()


@pytest.fixture
async def client(engines: _Engines) -> AsyncIterator[HttpxEngineClient]:
    async with engine_client(httpx.ASGITransport(app=engines.app())) as c:
        yield c


class _Changes:
    """Records a fleet's membership changes as (added names, removed names)."""

    def __init__(self, fleet: Fleet) -> None:
        self.seen: list[tuple[list[str], list[str]]] = []
        self.changed = asyncio.Event()
        fleet.on_change(self._record)

    async def _record(self, added: list[EngineSpec], removed: list[EngineSpec]) -> None:
        self.seen.append(([s.name for s in added], [s.name for s in removed]))
        self.changed.set()


def _watching_fleet(client: HttpxEngineClient, **source: Any) -> Fleet:
    """Engine "a", no probes or scrapes, membership from `source` (a fleet file or a source)."""
    return quiet_fleet([_spec("a")], client, **source)


async def test_engine_is_ejected_after_consecutive_failures_and_readmitted_after_one_success(
    engines: _Engines, client: HttpxEngineClient
) -> None:
    fleet = quiet_fleet([_spec("a"), _spec("b")], client, unhealthy_after=3)
    assert fleet.get("a").healthy  # type: ignore[union-attr]
    engines.health["a"] = 503
    for _ in range(2):
        await fleet.check_health()
        assert fleet.get("a").healthy  # type: ignore[union-attr]
    await fleet.check_health()
    a = fleet.get("a")
    assert a is not None and not a.healthy
    assert a.last_error == "GET http://a:8000/health: status 503"
    assert fleet.get("b").healthy  # type: ignore[union-attr]
    engines.health["a"] = 200
    await fleet.check_health()
    assert a.healthy and a.consecutive_failures == 0 and a.last_error is None


async def test_a_success_resets_the_failure_count(
    engines: _Engines, client: HttpxEngineClient
) -> None:
    fleet = quiet_fleet([_spec("a")], client, unhealthy_after=2)
    engines.health["a"] = 500
    await fleet.check_health()
    engines.health["a"] = 200
    await fleet.check_health()
    engines.health["a"] = 500
    await fleet.check_health()
    assert fleet.get("a").healthy  # type: ignore[union-attr]


async def test_proxy_connect_failures_count_toward_ejection(client: HttpxEngineClient) -> None:
    fleet = quiet_fleet([_spec("a")], client, unhealthy_after=2)
    fleet.mark_failure("a")
    assert fleet.get("a").healthy  # type: ignore[union-attr]
    fleet.mark_failure("a")
    assert not fleet.get("a").healthy  # type: ignore[union-attr]
    fleet.mark_failure("unknown-engine")  # ignored
    await fleet.check_health()
    assert fleet.get("a").healthy  # type: ignore[union-attr]


async def test_unreachable_engine_is_ejected() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = EngineSpec("dead", "llama", f"http://127.0.0.1:{port}", None)
    async with engine_client() as real:
        fleet = quiet_fleet([spec], real, unhealthy_after=1, probe_timeout_s=5.0)
        await fleet.check_health()
    state = fleet.get("dead")
    assert state is not None and not state.healthy
    assert state.last_error is not None
    assert state.last_error.startswith(f"GET http://127.0.0.1:{port}/health: ConnectError")


async def test_a_hung_health_endpoint_fails_by_the_probe_timeout(client: HttpxEngineClient) -> None:
    fleet = quiet_fleet([_spec("hung"), _spec("a")], client, unhealthy_after=1, probe_timeout_s=0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await fleet.check_health()
    assert loop.time() - started < DEADLINE_S
    hung, a = fleet.get("hung"), fleet.get("a")
    assert hung is not None and not hung.healthy
    assert hung.last_error == "GET http://hung:8000/health: timed out after 0.1 s"
    assert a is not None and a.healthy


async def test_health_loop_runs_after_start(engines: _Engines, client: HttpxEngineClient) -> None:
    engines.health["a"] = 503
    fleet = quiet_fleet([_spec("a")], client, health_interval_s=0.02, unhealthy_after=2)
    await fleet.start()
    try:
        await eventually(lambda: not fleet.get("a").healthy, "ejection")  # type: ignore[union-attr]
        engines.health["a"] = 200
        await eventually(lambda: fleet.get("a").healthy, "re-admission")  # type: ignore[union-attr]
    finally:
        await fleet.close()


async def test_in_flight_requests_and_tokens(client: HttpxEngineClient) -> None:
    fleet = quiet_fleet([_spec("a")], client)
    fleet.begin_request("a", 300)
    fleet.begin_request("a", 200)
    fleet.begin_request("gone", 50)  # an engine removed meanwhile: ignored
    a = fleet.get("a")
    assert a is not None and (a.in_flight_requests, a.outstanding_tokens) == (2, 500)
    fleet.end_request("a", 300)
    assert (a.in_flight_requests, a.outstanding_tokens) == (1, 200)
    fleet.end_request("a", 200)
    fleet.end_request("a", 200)  # never negative
    assert (a.in_flight_requests, a.outstanding_tokens) == (0, 0)


async def test_scrape_reads_vllm_gauges_and_survives_bad_bodies(
    engines: _Engines, client: HttpxEngineClient
) -> None:
    engines.running["a"] = 7
    fleet = quiet_fleet([_spec("a"), _spec("broken"), _spec("hung")], client, probe_timeout_s=0.1)
    await fleet.scrape()
    a, broken = fleet.get("a"), fleet.get("broken")
    assert a is not None and a.scraped == {NUM_REQUESTS_RUNNING: 7.0}
    assert a.scraped_at is not None
    assert broken is not None and broken.scraped == {} and broken.scraped_at is None
    hung = fleet.get("hung")  # its scrape timed out
    assert hung is not None and hung.scraped == {} and hung.scraped_at is None
    last = a.scraped_at
    engines.running["a"] = 2
    engines.metrics_status["a"] = 500  # a failed scrape keeps the last good gauges
    await fleet.scrape()
    assert a.scraped == {NUM_REQUESTS_RUNNING: 7.0} and a.scraped_at == last


async def test_scrape_loop_keeps_the_gauges_on_the_engine_state(
    engines: _Engines, client: HttpxEngineClient
) -> None:
    engines.running["a"] = 3
    fleet = quiet_fleet([_spec("a")], client, scrape_interval_s=0.02)
    await fleet.start()
    try:
        await eventually(
            lambda: fleet.get("a").scraped == {NUM_REQUESTS_RUNNING: 3.0},  # type: ignore[union-attr]
            "the first scrape",
        )
        engines.running["a"] = 5
        await eventually(
            lambda: fleet.get("a").scraped == {NUM_REQUESTS_RUNNING: 5.0},  # type: ignore[union-attr]
            "a later scrape",
        )
    finally:
        await fleet.close()


async def test_engines_for_model_resolves_base_models_and_lora_names(
    client: HttpxEngineClient,
) -> None:
    fleet = quiet_fleet(
        [
            _spec("a", lora=("sql",)),
            _spec("b"),
            _spec("c", model="qwen", lora=("chat",)),
        ],
        client,
    )
    base, serving = fleet.engines_for_model("llama")
    assert (base, [s.name for s in serving]) == ("llama", ["a", "b"])
    base, serving = fleet.engines_for_model("sql")
    assert (base, [s.name for s in serving]) == ("llama", ["a"])
    base, serving = fleet.engines_for_model("chat")
    assert (base, [s.name for s in serving]) == ("qwen", ["c"])
    assert fleet.engines_for_model("nope") == ("nope", [])


async def test_url_for_model_picks_a_healthy_engine_with_least_in_flight(
    client: HttpxEngineClient,
) -> None:
    fleet = quiet_fleet(
        [_spec("a", lora=("sql",)), _spec("b", lora=("sql",))], client, unhealthy_after=1
    )
    assert fleet.url_for_model("llama") == "http://a:8000"
    fleet.begin_request("a", 10)
    assert fleet.url_for_model("sql") == "http://b:8000"
    fleet.mark_failure("b")
    assert fleet.url_for_model("llama") == "http://a:8000"
    fleet.mark_failure("a")
    assert fleet.url_for_model("llama") is None
    assert fleet.url_for_model("nope") is None


async def test_models_lists_bases_and_adapters_with_parent(client: HttpxEngineClient) -> None:
    fleet = quiet_fleet(
        [_spec("a", lora=("sql", "chat")), _spec("b", lora=("sql",)), _spec("c", model="qwen")],
        client,
    )
    cards = fleet.models()
    assert [(c["id"], c["parent"]) for c in cards] == [
        ("llama", None),
        ("chat", "llama"),
        ("sql", "llama"),
        ("qwen", None),
    ]
    assert all(c["object"] == "model" and isinstance(c["created"], int) for c in cards)


async def test_update_reports_added_removed_and_changed_engines(
    client: HttpxEngineClient,
) -> None:
    fleet = quiet_fleet([_spec("a"), _spec("b"), _spec("c")], client, unhealthy_after=1)
    fleet.mark_failure("b")  # a changed engine starts healthy again
    changes = _Changes(fleet)
    fleet.begin_request("b", 100)
    changed_b = _spec("b", dp_ranks=(0, 1))
    added, removed = await fleet.update([_spec("a"), changed_b, _spec("d")])
    assert [s.name for s in added] == ["b", "d"]
    assert removed == [_spec("b"), _spec("c")]  # old spec of a changed engine
    assert changes.seen == [(["b", "d"], ["b", "c"])]
    assert [e.name for e in fleet.engines()] == ["a", "b", "d"]
    b = fleet.get("b")
    assert b is not None and b.spec == changed_b
    assert (b.in_flight_requests, b.outstanding_tokens) == (1, 100)  # in flight carries over
    assert b.healthy and b.consecutive_failures == 0
    assert fleet.get("c") is None
    assert fleet.get("d").healthy  # type: ignore[union-attr]
    assert await fleet.update([_spec("a"), changed_b, _spec("d")]) == ([], [])
    assert len(changes.seen) == 1


async def test_a_failing_callback_does_not_stop_others(client: HttpxEngineClient) -> None:
    fleet = quiet_fleet([], client)
    calls: list[str] = []

    async def broken(added: list[EngineSpec], removed: list[EngineSpec]) -> None:
        raise RuntimeError("listener bug")

    async def fine(added: list[EngineSpec], removed: list[EngineSpec]) -> None:
        calls.append("fine")

    fleet.on_change(broken)
    fleet.on_change(fine)
    await fleet.update([_spec("a")])
    assert calls == ["fine"] and fleet.get("a") is not None


async def test_duplicate_engine_names_are_rejected(client: HttpxEngineClient) -> None:
    with pytest.raises(ConfigError, match="expected unique"):
        quiet_fleet([_spec("a"), _spec("a")], client)
    fleet = quiet_fleet([_spec("a")], client)
    with pytest.raises(ConfigError, match="expected unique"):
        await fleet.update([_spec("b"), _spec("b")])
    assert [e.name for e in fleet.engines()] == ["a"]


def _write_fleet(path: Path, specs: list[dict[str, object]], bump: int) -> None:
    path.write_text(yaml.safe_dump({"engines": specs}))
    st = path.stat()  # make the change visible even on coarse-mtime file systems
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))


async def test_fleet_file_changes_are_applied_and_invalid_files_keep_the_old_fleet(
    tmp_path: Path, client: HttpxEngineClient
) -> None:
    path = tmp_path / "fleet.yaml"
    a = {"name": "a", "model": "llama", "url": "http://a:8000"}
    b = {"name": "b", "model": "llama", "url": "http://b:8000"}
    _write_fleet(path, [a], 0)
    fleet = _watching_fleet(client, fleet_file=path)
    changes = _Changes(fleet)
    await fleet.start()
    try:
        _write_fleet(path, [a, b], 1)
        await asyncio.wait_for(changes.changed.wait(), DEADLINE_S)
        assert changes.seen == [(["b"], [])]
        _write_fleet(path, [a, {**b, "url": "gopher://b"}], 2)
        await eventually(lambda: fleet.reloads["error"] == 1, "the invalid file to be counted")
        assert [e.name for e in fleet.engines()] == ["a", "b"]  # the old fleet stays
        changes.changed.clear()
        _write_fleet(path, [b], 3)
        await asyncio.wait_for(changes.changed.wait(), DEADLINE_S)
        assert changes.seen[-1] == ([], ["a"])
        assert [e.name for e in fleet.engines()] == ["b"]
        assert fleet.reloads["ok"] == 2
        path.unlink()  # a vanished file is an error, not an empty fleet
        await eventually(lambda: fleet.reloads["error"] == 2, "the missing file to be counted")
        assert [e.name for e in fleet.engines()] == ["b"]
    finally:
        await fleet.close()


async def test_close_is_idempotent_and_start_twice_is_harmless(
    engines: _Engines, client: HttpxEngineClient
) -> None:
    engines.health["a"] = 503
    # One probe per loop start, then a long wait: the probe count tells how many loops run.
    fleet = quiet_fleet([_spec("a")], client, health_interval_s=60.0)
    a = fleet.get("a")
    assert a is not None
    await fleet.start()
    await fleet.start()  # no second health loop
    await eventually(lambda: a.consecutive_failures >= 1, "the first probe")
    assert (engines.probes["a"], a.consecutive_failures) == (1, 1)
    await fleet.close()
    await fleet.close()
    await fleet.start()  # closed loops are gone, so a start after close probes again
    try:
        await eventually(lambda: a.consecutive_failures >= 2, "the probe after the restart")
        assert (engines.probes["a"], a.consecutive_failures) == (2, 2)
    finally:
        await fleet.close()


class _QueueSource:
    """A FleetSource fed by the test, as a Kubernetes pod watcher would be fed by the API."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[list[EngineSpec] | Exception] = asyncio.Queue()

    async def watch(self) -> AsyncIterator[list[EngineSpec]]:
        while True:
            item = await self.queue.get()
            if isinstance(item, Exception):
                raise item  # the watch breaks; the fleet calls watch() again
            yield item


async def test_any_fleet_source_drives_membership(client: HttpxEngineClient) -> None:
    source = _QueueSource()
    fleet = _watching_fleet(client, source=source)
    changes = _Changes(fleet)
    await fleet.start()
    try:
        source.queue.put_nowait([_spec("a"), _spec("pod-1")])
        await eventually(lambda: len(changes.seen) == 1, "the pod to be added")
        source.queue.put_nowait([_spec("x"), _spec("x")])  # an invalid list is rejected, counted
        await eventually(lambda: fleet.reloads["error"] == 1, "the rejected update to be counted")
        source.queue.put_nowait(RuntimeError("API server went away"))
        await eventually(lambda: fleet.reloads["error"] == 2, "the broken source to be counted")
        source.queue.put_nowait([_spec("pod-1")])
        await eventually(lambda: len(changes.seen) == 2, "engine a to be removed")
    finally:
        await fleet.close()
    assert changes.seen == [(["pod-1"], []), ([], ["a"])]
    assert [e.name for e in fleet.engines()] == ["pod-1"]
