"""The simulator's KV-event stream on real ZMQ sockets: content, layouts and fault switches."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import zmq
import zmq.asyncio

from kvroute.events.replay import request_replay
from kvroute.events.vllm_events import (
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEventBatch,
)
from kvroute.events.wire import decode_vllm
from kvroute.sim import SimConfig, SimFleet

MODEL = "sim/events-model"
_probe = itertools.count()


class Tap:
    """A SUB socket on one engine rank plus an HTTP client to drive it."""

    def __init__(self, fleet: SimFleet, ctx: zmq.asyncio.Context, rank: int = 0) -> None:
        self.engine = fleet.engines[0]
        self.tokenizer = fleet.tokenizer
        self.ctx = ctx
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, fleet.config.topic.encode())
        self.sub.connect(self.engine.events_endpoints[rank])
        self.http = httpx.AsyncClient(base_url=self.engine.url, timeout=10)

    async def complete(self, prompt: list[int] | str, max_tokens: int = 1) -> httpx.Response:
        r = await self.http.post(
            "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
        )
        assert r.status_code == 200, r.text
        return r

    async def fresh_prompt(self, n_tokens: int = 40) -> str:
        return self.tokenizer.make_text(n_tokens, seed=f"probe-{next(_probe)}")

    async def subscribed(self) -> None:
        """Probe until the subscription is live (PUB drops what is sent before), then drain."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while loop.time() < deadline:
            await self.complete(await self.fresh_prompt())
            if await self.sub.poll(200):
                await self.drain()
                return
        raise AssertionError("SUB never received a batch")

    async def recv(self, timeout_s: float = 10.0) -> tuple[bytes, int, VllmEventBatch]:
        assert await self.sub.poll(int(timeout_s * 1000)), "no batch arrived"
        topic, seq, payload = await self.sub.recv_multipart()
        return topic, int.from_bytes(seq, "big"), decode_vllm(payload)

    async def drain(self, quiet_ms: int = 150) -> list[tuple[int, VllmEventBatch]]:
        out = []
        while await self.sub.poll(quiet_ms):
            _, seq, payload = await self.sub.recv_multipart()
            out.append((int.from_bytes(seq, "big"), decode_vllm(payload)))
        return out

    async def state(self) -> dict[str, Any]:
        r = await self.http.get("/sim/state")
        return dict(r.json())

    async def faults(self, **body: Any) -> None:
        r = await self.http.post("/sim/faults", json=body)
        assert r.status_code == 200, r.text

    async def close(self) -> None:
        self.sub.close(linger=0)
        await self.http.aclose()


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    c = zmq.asyncio.Context()
    yield c
    c.term()


async def _tap(ctx: zmq.asyncio.Context, **cfg: Any) -> AsyncIterator[Tap]:
    fleet = SimFleet(1, MODEL, config=SimConfig(speed=50.0, **cfg), lora=["ad"])
    await fleet.start()
    tap = Tap(fleet, ctx)
    try:
        await tap.subscribed()
        yield tap
    finally:
        await tap.close()
        await fleet.close()


@pytest.fixture
async def tap(ctx: zmq.asyncio.Context) -> AsyncIterator[Tap]:
    async for t in _tap(ctx):
        yield t


@pytest.mark.parametrize(
    ("release", "bytes_hashes"), [("0.33.0", False), ("0.22.0", False), ("0.9.0", True)]
)
async def test_live_batches_match_the_block_pool(
    ctx: zmq.asyncio.Context, release: str, bytes_hashes: bool
) -> None:
    async for tap in _tap(ctx, release=release, bytes_hashes=bytes_hashes):
        state0 = await tap.state()
        prompt = await tap.fresh_prompt(40)
        await tap.complete(prompt, max_tokens=2)
        topic, seq, batch = await tap.recv()
        assert topic == b"kv" and seq == state0["ranks"][0]["seq"] + 1
        [ev] = batch.events
        assert isinstance(ev, VllmBlockStored)
        assert ev.parent_block_hash is None and ev.block_size == 16 and len(ev.block_hashes) == 2
        assert ev.token_ids == tap.tokenizer.encode(prompt)[:32]
        if release != "0.9.0":
            assert batch.data_parallel_rank == 0
            assert ev.medium == "GPU" and ev.group_idx == (0 if release != "0.9.0" else None)
        kind = bytes if bytes_hashes else int
        assert all(isinstance(h, kind) for h in ev.block_hashes)
        if bytes_hashes:
            assert all(len(h) == 32 for h in ev.block_hashes)  # type: ignore[arg-type]
        cached = {_h(b["hash"]) for b in (await tap.state())["ranks"][0]["cached"]}
        assert set(ev.block_hashes) <= cached


def _h(j: Any) -> int | bytes:
    return bytes.fromhex(j["hex"]) if isinstance(j, dict) else int(j)


async def test_lora_request_blocks_carry_lora_name_and_id(tap: Tap) -> None:
    r = await tap.http.post(
        "/v1/completions", json={"model": "ad", "prompt": [1] * 17, "max_tokens": 1}
    )
    assert r.status_code == 200
    _, _, batch = await tap.recv()
    [ev] = batch.events
    assert isinstance(ev, VllmBlockStored) and ev.lora_name == "ad" and ev.lora_id == 1


async def test_idle_engine_publishes_nothing_and_reset_goes_out_with_next_step(tap: Tap) -> None:
    assert (await tap.http.post("/reset_prefix_cache")).status_code == 200
    assert await tap.drain(quiet_ms=300) == []  # idle: AllBlocksCleared waits for a step
    await tap.complete(await tap.fresh_prompt(20))
    _, _, batch = await tap.recv()
    assert isinstance(batch.events[0], VllmAllBlocksCleared)
    assert isinstance(batch.events[1], VllmBlockStored)


async def test_drop_next_leaves_a_live_gap_that_replay_fills(tap: Tap) -> None:
    await tap.faults(drop_next=2)
    seq0 = (await tap.state())["ranks"][0]["seq"]
    for _ in range(3):
        await tap.complete(await tap.fresh_prompt(20))
    got = await tap.drain()
    assert [s for s, _ in got] == [seq0 + 3]
    replay_ep = tap.engine.replay_endpoints[0]
    assert replay_ep is not None
    result = await request_replay(tap.ctx, replay_ep, seq0 + 1, timeout_s=5)
    assert result.complete and [s for s, _ in result.batches] == [seq0 + 1, seq0 + 2, seq0 + 3]
    assert decode_vllm(result.batches[0][1]).events


async def test_restart_resets_seq_and_pool_without_all_blocks_cleared(tap: Tap) -> None:
    assert (await tap.state())["ranks"][0]["cached"]
    await tap.faults(restart=True)
    state = await tap.state()
    assert state["ranks"][0]["seq"] is None and state["ranks"][0]["cached"] == []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    got: list[tuple[int, VllmEventBatch]] = []
    while not got and loop.time() < deadline:  # the SUB reconnects to the rebound port
        await tap.complete(await tap.fresh_prompt(20))
        got = await tap.drain()
    assert got, "no batch after restart"
    seqs = [s for s, _ in got]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert seqs[-1] == (await tap.state())["ranks"][0]["seq"]
    for _, batch in got:
        assert not any(isinstance(e, VllmAllBlocksCleared) for e in batch.events)


async def test_duplicate_stores_sends_each_store_twice(tap: Tap) -> None:
    await tap.faults(duplicate_stores=True)
    await tap.complete(await tap.fresh_prompt(20))
    _, _, batch = await tap.recv()
    assert len(batch.events) == 2 and batch.events[0] == batch.events[1]
    await tap.faults(duplicate_stores=False)
    await tap.complete(await tap.fresh_prompt(20))
    _, _, batch = await tap.recv()
    assert len(batch.events) == 1


async def test_pause_queues_batches_and_resume_flushes_them_in_order(tap: Tap) -> None:
    seq0 = (await tap.state())["ranks"][0]["seq"]
    await tap.faults(pause=True)
    for _ in range(3):
        await tap.complete(await tap.fresh_prompt(20))
    assert await tap.drain(quiet_ms=300) == []
    await tap.faults(pause=False)
    got = await tap.drain()
    assert [s for s, _ in got] == [seq0 + 1, seq0 + 2, seq0 + 3]


async def test_replay_server_can_be_stopped_and_started(tap: Tap) -> None:
    ep = tap.engine.replay_endpoints[0]
    assert ep is not None
    await tap.faults(replay="stop")
    result = await request_replay(tap.ctx, ep, 0, timeout_s=0.5)
    assert not result.complete
    await tap.faults(replay="start")
    result = await request_replay(tap.ctx, ep, 0, timeout_s=5)
    assert result.complete and result.batches[0][0] == 0


async def test_eviction_sends_block_removed_before_stores(ctx: zmq.asyncio.Context) -> None:
    async for tap in _tap(ctx, num_gpu_blocks=8):
        await tap.drain()
        await tap.complete(await tap.fresh_prompt(16 * 7 - 1))  # 7 blocks incl. BOS
        await tap.drain()
        await tap.complete(await tap.fresh_prompt(16 * 7 - 1))
        _, _, batch = await tap.recv()
        kinds = [type(e) for e in batch.events]
        assert VllmBlockRemoved in kinds
        first_store = kinds.index(VllmBlockStored)
        assert all(k is VllmBlockRemoved for k in kinds[:first_store])
        assert len((await tap.state())["ranks"][0]["cached"]) <= 8
