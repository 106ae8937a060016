"""SharedState against a real redis-server: replicas see each other's in-flight counts and
speculative claims, a crashed replica's counts expire, and a store killed and restarted
costs nothing but the sharing while it is down."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from kvroute.core import LoadSource
from kvroute.fleet import EngineSpec, Fleet, SpeculativeClaim
from kvroute.fleet.shared_state import SharedState
from kvroute.upstream import HttpxEngineClient
from tests.engine_clients import engine_client, quiet_fleet
from tests.polling import eventually
from tests.redis_server import RedisServer, redis_server

DEADLINE_S = 15.0
INTERVAL_S = 0.05
TTL_S = 1.0
ROOT = Path(__file__).resolve().parents[3]


def _specs() -> list[EngineSpec]:
    return [
        EngineSpec(name=n, model="m", url=f"http://{n}:8000", events=None)  # type: ignore[arg-type]
        for n in ("e0", "e1")
    ]


class _Replica:
    """One replica's fleet and shared state; claims from the others land in `claims`."""

    def __init__(
        self,
        url: str,
        client: HttpxEngineClient,
        prefix: str,
        interval_s: float = INTERVAL_S,
        ttl_s: float = TTL_S,
    ) -> None:
        self.fleet: Fleet = quiet_fleet(_specs(), client, load_source=LoadSource.LOCAL)
        self.claims: list[SpeculativeClaim] = []
        self.shared = SharedState(
            url,
            loads=self.fleet.local_loads,
            on_loads=self.fleet.set_shared_load,
            on_claim=self._claimed,
            interval_s=interval_s,
            ttl_s=ttl_s,
            key_prefix=prefix,
            backoff_s=(0.05, 0.2),
        )
        self.fleet.on_local_load(self.shared.loads_changed)

    def _claimed(self, claim: SpeculativeClaim) -> bool:
        if self.fleet.get(claim.engine) is None:
            return False
        self.claims.append(claim)
        return True

    def shared_on(self, engine: str) -> tuple[int | None, int]:
        state = self.fleet.get(engine)
        assert state is not None
        return state.shared_requests, state.shared_tokens

    def ready(self) -> bool:
        return self.shared.up and self.shared.subscribed


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with redis_server(tmp_path) as server:
        yield server


@pytest.fixture
async def replicas(
    redis: RedisServer, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., _Replica]]:
    prefix = f"kvroute-test-{os.getpid()}-{request.node.name}"
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(engine_client())

        def make(**kwargs: float) -> _Replica:
            replica = _Replica(redis.url, client, prefix, **kwargs)
            stack.push_async_callback(replica.shared.close)
            return replica

        yield make


async def _start(*replicas: _Replica) -> None:
    for r in replicas:
        await r.shared.start()
    await eventually(
        lambda: all(r.ready() and r.shared.peers == len(replicas) - 1 for r in replicas),
        "every replica connected, subscribed and seeing the others",
        timeout_s=DEADLINE_S,
    )


async def test_replicas_see_each_others_in_flight_counts(
    replicas: Callable[[], _Replica],
) -> None:
    a, b = replicas(), replicas()
    await _start(a, b)
    a.fleet.begin_request("e0", 1000)
    a.fleet.begin_request("e0", 500)
    b.fleet.begin_request("e1", 70)
    await eventually(lambda: b.shared_on("e0") == (2, 1500), "b sees a's two requests on e0")
    await eventually(lambda: a.shared_on("e1") == (1, 70), "a sees b's request on e1")
    assert b.shared_on("e1") == (0, 0) and a.shared_on("e0") == (0, 0)  # not its own
    e0 = b.fleet.get("e0")
    assert e0 is not None
    assert b.fleet.load(e0).pair() == (2, 1500)  # local load source: own 0 + shared
    a.fleet.end_request("e0", 1000)
    a.fleet.end_request("e0", 500)
    await eventually(lambda: b.shared_on("e0") == (0, 0), "a's requests ended, for b too")
    await a.shared.close()  # a clean stop deletes a's key at once
    await eventually(lambda: b.shared.peers == 0, "b no longer counts a")


async def test_in_flight_changes_are_pushed_without_waiting_for_the_sync(
    redis: RedisServer, replicas: Callable[..., _Replica], request: pytest.FixtureRequest
) -> None:
    # A sync interval far beyond the test's deadline: only the load channel can carry these.
    a, b = replicas(interval_s=600.0, ttl_s=1200.0), replicas(interval_s=600.0, ttl_s=1200.0)
    for r in (a, b):
        await r.shared.start()
    await eventually(lambda: a.ready() and b.ready(), "both connected and subscribed")
    a.fleet.begin_request("e0", 1000)
    await eventually(lambda: b.shared_on("e0") == (1, 1000), "b sees a's request at once")
    assert b.shared.peers == 1 and b.shared.load_updates["received"] >= 1
    a.fleet.begin_request("e1", 30)
    a.fleet.end_request("e0", 1000)
    await eventually(
        lambda: b.shared_on("e0") == (0, 0) and b.shared_on("e1") == (1, 30),
        "b sees a's request end and the next start",
    )
    # A message older than what b holds (a replayed or reordered one) changes nothing.
    prefix = f"kvroute-test-{os.getpid()}-{request.node.name}"
    stale = msgspec.msgpack.encode([a.shared.replica_id, 1, {"e0": [7, 7000]}])
    newer = msgspec.msgpack.encode(["a-third-replica", 1, {"e0": [2, 20]}])
    raw = aioredis.Redis.from_url(redis.url)
    try:
        for message in (stale, b"not msgpack", newer):
            await raw.publish(f"{prefix}:loads", message)
    finally:
        await raw.aclose()
    await eventually(lambda: b.shared_on("e0") == (2, 20), "the third replica's message")
    assert b.shared_on("e1") == (1, 30) and b.shared.dropped["malformed"] == 1
    assert a.shared.load_updates["sent"] == 2  # the two changes made together went as one


async def test_a_crashed_replicas_counts_expire_after_the_ttl(
    redis: RedisServer, replicas: Callable[[], _Replica], request: pytest.FixtureRequest
) -> None:
    b = replicas()
    await _start(b)
    prefix = f"kvroute-test-{os.getpid()}-{request.node.name}"
    # Another replica in its own process, killed with SIGKILL while it has a request in flight.
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from kvroute.fleet import EngineSpec, Fleet
        from kvroute.fleet.shared_state import SharedState
        from kvroute.upstream import HttpxEngineClient

        async def main():
            spec = EngineSpec(name="e0", model="m", url="http://e0:8000", events=None)
            async with HttpxEngineClient(
                connect_timeout_s=1, read_timeout_s=1, max_connections=1
            ) as client:
                fleet = Fleet([spec], client, health_interval_s=0, unhealthy_after=1,
                              scrape_interval_s=0, watch_interval_s=1)
                fleet.begin_request("e0", 900)
                shared = SharedState({redis.url!r}, loads=fleet.local_loads,
                                     on_loads=fleet.set_shared_load, on_claim=lambda c: True,
                                     interval_s={INTERVAL_S}, ttl_s={TTL_S},
                                     key_prefix={prefix!r}, backoff_s=(0.05, 0.2))
                await shared.start()
                while not shared.up:
                    await asyncio.sleep(0.01)
                print("up", flush=True)
                await asyncio.Event().wait()

        asyncio.run(main())
        """
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), DEADLINE_S)
        assert line.strip() == b"up"
        await eventually(lambda: b.shared_on("e0") == (1, 900), "b sees the other process")
        proc.send_signal(signal.SIGKILL)  # no clean stop: its key stays until the TTL
        await proc.wait()
        await eventually(
            lambda: b.shared_on("e0") == (0, 0) and b.shared.peers == 0,
            "the dead replica's counts expired",
            timeout_s=DEADLINE_S,
        )
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_speculative_claims_reach_the_other_replicas_only(
    replicas: Callable[[], _Replica],
) -> None:
    a, b = replicas(), replicas()
    await _start(a, b)
    tokens = list(range(1, 2049))
    a.shared.claim(SpeculativeClaim("e1", "m", None, tokens, "salt"))
    a.shared.claim(SpeculativeClaim("not-in-b's-fleet", "m", "lora", [5], None))
    await eventually(lambda: len(b.claims) == 1, "b received a's claim")
    assert b.claims == [SpeculativeClaim("e1", "m", None, tokens, "salt")]
    await eventually(lambda: b.shared.dropped["unknown_engine"] == 1, "the unknown engine")
    assert a.claims == []  # a's own claims are already in a's index
    assert a.shared.claims["sent"] == 2 and b.shared.claims["received"] == 2


async def test_store_killed_and_restarted_costs_only_the_sharing(
    redis: RedisServer, replicas: Callable[[], _Replica], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kvroute.fleet.shared_state")
    a, b = replicas(), replicas()
    await _start(a, b)
    a.fleet.begin_request("e0", 400)
    await eventually(lambda: b.shared_on("e0") == (1, 400), "sharing before the outage")

    await redis.kill()
    await eventually(lambda: not a.shared.up and not b.shared.up, "both replicas notice")
    # Routing falls back to each replica's own counts, nothing raised anywhere.
    assert b.shared_on("e0") == (None, 0)
    e0 = b.fleet.get("e0")
    assert e0 is not None and b.fleet.load(e0).pair() == (0, 0)
    a.shared.claim(SpeculativeClaim("e0", "m", None, [1, 2, 3], None))  # dropped, counted
    assert a.shared.dropped["store_down"] >= 1
    failures = b.shared.errors["sync"]
    await eventually(lambda: b.shared.errors["sync"] >= failures + 2, "b keeps retrying")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len([r for r in warnings if "unreachable" in r.getMessage()]) == 2  # once per replica

    await redis.start()  # same port, empty store
    await eventually(
        lambda: a.ready() and b.ready() and a.shared.peers == b.shared.peers == 1,
        "both replicas back, subscribed again and seeing each other",
        timeout_s=DEADLINE_S,
    )
    await eventually(lambda: b.shared_on("e0") == (1, 400), "counts shared again")
    a.shared.claim(SpeculativeClaim("e0", "m", None, [7, 8, 9], None))
    await eventually(lambda: len(b.claims) == 1, "claims flow again")
    back = [r for r in caplog.records if "reachable again" in r.getMessage()]
    assert len(back) == 2 and all(r.levelno == logging.INFO for r in back)
