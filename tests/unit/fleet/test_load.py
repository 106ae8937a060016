"""The load routing uses: the blending rule (pure) and the fleet keeping what it needs (the
engine's report, the in-flight counts when each scrape left, the shared store's counts)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from kvroute.core import LoadSource
from kvroute.errors import ConfigError
from kvroute.fleet import EngineLoad, EngineSpec, Fleet, LoadView, blend_load
from kvroute.fleet.load import DEFAULT_TOKENS_PER_REQUEST
from kvroute.upstream import HttpxEngineClient
from tests.engine_clients import engine_client, quiet_fleet

TPR = 1000.0  # tokens per request of the unaccounted requests, in the pure tests


# ---- the rule ----------------------------------------------------------------------------------


def test_local_is_what_this_replica_sent_whatever_the_engine_reports() -> None:
    view = LoadView(local_requests=2, local_tokens=3000, reported=9, local_at_report=1)
    assert blend_load(view, LoadSource.LOCAL, TPR) == EngineLoad(2, 3000)


def test_engine_is_the_report_alone_in_tokens_per_request() -> None:
    view = LoadView(local_requests=2, local_tokens=3000, reported=9, local_at_report=1)
    assert blend_load(view, LoadSource.ENGINE, TPR) == EngineLoad(9, 9000)


def test_blended_adds_what_the_report_holds_beyond_this_replicas_requests() -> None:
    # The engine had 5 when scraped, 2 of them this replica's; since then this replica sent 3
    # more and 1 of its earlier two ended: 3 others + this replica's 4 exact.
    view = LoadView(local_requests=4, local_tokens=4400, reported=5, local_at_report=2)
    assert blend_load(view, LoadSource.BLENDED, TPR) == EngineLoad(7, 4400 + 3000)


def test_blended_sees_requests_sent_since_the_scrape_the_engine_could_not_report() -> None:
    view = LoadView(local_requests=3, local_tokens=3300, reported=0, local_at_report=0)
    assert blend_load(view, LoadSource.BLENDED, TPR) == EngineLoad(3, 3300)


def test_blended_never_counts_fewer_others_than_none() -> None:
    # This replica had 4 there when scraped but the engine reported 2 (two still on the way).
    view = LoadView(local_requests=4, local_tokens=4000, reported=2, local_at_report=4)
    assert blend_load(view, LoadSource.BLENDED, TPR) == EngineLoad(4, 4000)


def test_without_a_fresh_report_engine_and_blended_fall_back_to_local() -> None:
    view = LoadView(local_requests=1, local_tokens=700)
    for source in LoadSource:
        assert blend_load(view, source, TPR) == EngineLoad(1, 700)


def test_shared_counts_are_known_load_and_not_counted_again_from_the_report() -> None:
    # Report 6 = this replica's 1 + the others' 3 (shared, at the scrape) + 2 from a client
    # that bypasses kvroute. Now the others have 5 there.
    view = LoadView(
        local_requests=1,
        local_tokens=1200,
        reported=6,
        local_at_report=1,
        shared_requests=5,
        shared_tokens=5500,
        shared_at_report=3,
    )
    assert blend_load(view, LoadSource.BLENDED, TPR) == EngineLoad(1 + 5 + 2, 1200 + 5500 + 2000)
    assert blend_load(view, LoadSource.LOCAL, TPR) == EngineLoad(6, 6700)
    assert blend_load(view, LoadSource.ENGINE, TPR) == EngineLoad(6, 6000)


def test_a_store_that_came_up_after_the_scrape_stands_in_for_it_then() -> None:
    view = LoadView(
        local_requests=0, local_tokens=0, reported=4, shared_requests=4, shared_tokens=4400
    )
    assert blend_load(view, LoadSource.BLENDED, TPR) == EngineLoad(4, 4400)


# ---- the fleet ---------------------------------------------------------------------------------


@dataclass
class _Engine:
    """One engine's /metrics: running and waiting as the test sets them."""

    running: float = 0.0
    waiting: float = 0.0

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{engine="0"}} {self.running}\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{engine="0"}} {self.waiting}\n'
        )

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/metrics", self.metrics)])


@pytest.fixture
def engine() -> _Engine:
    return _Engine()


@pytest.fixture
async def client(engine: _Engine) -> AsyncIterator[HttpxEngineClient]:
    async with engine_client(httpx.ASGITransport(app=engine.app())) as c:
        yield c


def _fleet(client: HttpxEngineClient, **knobs: object) -> Fleet:
    """A one-engine fleet that blends the engine's reports in (unless `load_source` says)."""
    spec = EngineSpec(name="a", model="m", url="http://a:8000", events=None)  # type: ignore[arg-type]
    return quiet_fleet([spec], client, **{"load_source": LoadSource.BLENDED, **knobs})


async def test_a_scrape_remembers_what_this_replica_had_in_flight_when_it_left(
    engine: _Engine, client: HttpxEngineClient
) -> None:
    fleet = _fleet(client)
    fleet.begin_request("a", 2000)
    fleet.begin_request("a", 2000)
    engine.running, engine.waiting = 3.0, 2.0  # our 2 + 3 from elsewhere
    await fleet.scrape()
    a = fleet.get("a")
    assert a is not None and a.scraped_local_requests == 2
    assert fleet.load(a) == EngineLoad(5, 4000 + 3 * 2000)
    fleet.begin_request("a", 2000)  # sent after the scrape: the report cannot hold it
    fleet.end_request("a", 2000)  # one of ours the report holds ended
    assert fleet.load(a) == EngineLoad(5, 4000 + 3 * 2000)
    fleet.end_request("a", 2000)
    fleet.end_request("a", 2000)
    assert fleet.load(a) == EngineLoad(3, 3 * 2000)  # only the others' left


async def test_the_tokens_per_request_follow_this_replicas_requests(
    client: HttpxEngineClient,
) -> None:
    fleet = _fleet(client)
    assert fleet.tokens_per_request == DEFAULT_TOKENS_PER_REQUEST
    fleet.begin_request("a", 3000)
    assert fleet.tokens_per_request == 3000.0
    for _ in range(500):
        fleet.begin_request("a", 1000)
    assert fleet.tokens_per_request == pytest.approx(1000.0, abs=1.0)
    fleet.begin_request("gone", 0)  # no size: not a sample
    assert fleet.tokens_per_request == pytest.approx(1000.0, abs=1.0)


async def test_an_old_report_is_not_used(engine: _Engine, client: HttpxEngineClient) -> None:
    fleet = _fleet(client, scrape_interval_s=0.5)
    engine.running = 4.0
    await fleet.scrape()
    a = fleet.get("a")
    assert a is not None and a.scraped_at is not None
    assert fleet.load(a, now=a.scraped_at + 1.5).requests == 4  # 3 intervals: still fresh
    assert fleet.load(a, now=a.scraped_at + 1.6).requests == 0  # older: local only


async def test_the_load_source_setting_picks_the_rule(
    engine: _Engine, client: HttpxEngineClient
) -> None:
    engine.running = 4.0
    loads = {}
    for source in LoadSource:
        fleet = _fleet(client, load_source=source)
        fleet.begin_request("a", 500)
        await fleet.scrape()
        a = fleet.get("a")
        assert a is not None
        loads[source] = fleet.load(a)
    assert loads == {
        LoadSource.LOCAL: EngineLoad(1, 500),
        LoadSource.ENGINE: EngineLoad(4, 2000),
        LoadSource.BLENDED: EngineLoad(4, 500 + 3 * 500),
    }
    with pytest.raises(ConfigError, match="load_source: expected one of local, engine, blended"):
        _fleet(client, load_source="nowhere")


async def test_shared_counts_join_until_the_store_goes_away(
    engine: _Engine, client: HttpxEngineClient
) -> None:
    fleet = _fleet(client)
    fleet.set_shared_load({"a": (2, 3000), "not-ours": (9, 9)})
    engine.running = 3.0  # the others' 2 + one that bypasses kvroute
    await fleet.scrape()
    a = fleet.get("a")
    assert a is not None and a.scraped_shared_requests == 2
    assert fleet.load(a) == EngineLoad(3, 3000 + 1024)  # no request of ours: default size
    fleet.set_shared_load({"a": (0, 0)})  # the others' requests ended
    assert fleet.load(a) == EngineLoad(1, 1024)
    fleet.set_shared_load(None)  # store down: the report's others count again, as others
    assert a.shared_requests is None and a.scraped_shared_requests is None
    assert fleet.load(a) == EngineLoad(3, 3 * 1024)
    assert fleet.local_loads() == {}
    fleet.begin_request("a", 100)
    assert fleet.local_loads() == {"a": (1, 100)}


async def test_a_changed_engine_keeps_its_shared_counts(client: HttpxEngineClient) -> None:
    fleet = _fleet(client)
    fleet.set_shared_load({"a": (2, 3000)})
    (spec,) = fleet.specs()
    moved = EngineSpec(name="a", model="m", url="http://a2:8000", events=None)  # type: ignore[arg-type]
    assert moved != spec
    await fleet.update([moved])
    a = fleet.get("a")
    assert a is not None and (a.shared_requests, a.shared_tokens) == (2, 3000)
