"""kvroute's subscriber + index, fed by the simulator's events, hold exactly the simulator's
cached blocks (read from its block pools) at every quiet point of a randomized run."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx
import pytest
import zmq.asyncio

from kvroute.core import LocalHash, SourceId, SourceSpec, source_id
from kvroute.events import SubscriberManager
from kvroute.index import PrefixIndex, prompt_hashes
from kvroute.metrics import Metrics
from kvroute.sim import BlockPool, SimConfig, SimEngine, SimFleet
from tests.event_harness import applied, make_stack, until
from tests.polling import eventually

MODEL = "sim/agreement"
LORA = "ad"
BS = 16


class Truth:
    """engine hash -> our local hash, learned from the token ids of every request sent."""

    def __init__(self, fleet: SimFleet) -> None:
        self.fleet = fleet
        self.to_local: dict[int | bytes, LocalHash] = {}

    def learn(self, prompt: list[int], max_tokens: int, lora: str | None) -> None:
        out = self.fleet.tokenizer.generate(prompt, max_tokens)
        tokens = prompt + out[: max_tokens - 1]  # the last sampled token is never computed
        pool = BlockPool(1, BS, bytes_hashes=self.fleet.config.bytes_hashes)
        engine = [pool.external(d) for d in pool.chain_digests(tokens, lora)]
        local = prompt_hashes(MODEL, lora, tokens, BS)
        self.to_local.update(zip(engine, local, strict=True))


def _hash(j: Any) -> int | bytes:
    return bytes.fromhex(j["hex"]) if isinstance(j, dict) else int(j)


async def _wait_connected(mgr: SubscriberManager, n: int) -> None:
    def connected() -> bool:
        st = mgr.status()
        return len(st) == n and all(s.connected for s in st)

    await eventually(connected, f"{n} subscribers connected")


def _total(metrics: Metrics, name: str) -> float:
    return sum(
        sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    )


async def _settled(
    mgr: SubscriberManager,
    index: PrefixIndex,
    sid: SourceId,
    seq: int | None,
    expected: set[LocalHash],
    *,
    patient: bool,
) -> set[LocalHash]:
    """What the index holds for `sid` once `seq` is applied. Strict mode reads it right away;
    patient mode (after restarts and drops) polls until it matches, so a reset that the
    subscriber learns from a ZMQ disconnect has time to land."""
    if seq is not None:
        assert await applied(mgr, sid, seq), f"{sid} never applied seq {seq}"

    def held() -> set[LocalHash]:
        return {h for h, m in index.holdings(sid) if m == "GPU"}

    if patient:
        await until(lambda: held() == expected, 10.0)
    return held()


@pytest.mark.parametrize(
    ("seed", "release", "bytes_hashes", "chaos"),
    [(20261123, "0.33.0", False, False), (7, "0.22.0", True, True)],
    ids=["seed20261123-0.33.0-int", "seed7-0.22.0-bytes-restarts-drops"],
)
async def test_index_holds_exactly_the_simulator_blocks_at_every_quiet_point(
    ctx: zmq.asyncio.Context, seed: int, release: str, bytes_hashes: bool, chaos: bool
) -> None:
    rng = random.Random(seed)
    cfg = SimConfig(
        speed=1000.0, num_gpu_blocks=40, max_num_seqs=6, block_size=BS, release=release,
        bytes_hashes=bytes_hashes,
    )  # fmt: skip
    fleet = SimFleet(2, MODEL, dp_ranks=2, config=cfg, lora=[LORA])
    await fleet.start()
    stack = make_stack(ctx, replay_timeout_s=5.0, retry_backoff_s=(0.5, 10.0))
    index, mgr = stack.index, stack.manager
    truth = Truth(fleet)
    client = httpx.AsyncClient(timeout=30)
    try:
        sources = []
        for e in fleet.engines:
            for r, (ep, rep) in enumerate(zip(e.events_endpoints, e.replay_endpoints, strict=True)):
                sid = source_id(e.name, r)
                sources.append((e, r, sid))
                spec = SourceSpec(e.name, MODEL, ep, rep, topic="kv", rank=r)
                assert spec.source == sid
                await mgr.add_source(spec)
        await _wait_connected(mgr, len(sources))

        prefixes = [[1, *(rng.randrange(100, 30_000) for _ in range(rng.choice((15, 31, 47))))]
                    for _ in range(6)]  # fmt: skip

        async def one() -> None:
            prompt = list(rng.choice(prefixes)) if rng.random() < 0.8 else [1]
            prompt += [rng.randrange(100, 30_000) for _ in range(rng.randrange(1, 60))]
            lora = LORA if rng.random() < 0.2 else None
            max_tokens = rng.randrange(1, 12)
            truth.learn(prompt, max_tokens, lora)
            engine = rng.choice(fleet.engines)
            r = await client.post(
                engine.url + "/v1/completions",
                json={"model": lora or MODEL, "prompt": prompt, "max_tokens": max_tokens},
            )
            assert r.status_code == 200, r.text

        async def state(e: SimEngine) -> dict[str, Any]:
            return dict((await client.get(e.url + "/sim/state")).json())

        sent = compared = rounds = 0
        reset_done = False
        compared_after_reset: dict[str, int] = {str(s): 0 for _, _, s in sources}
        dropped_seq: dict[SourceId, int] = {}  # a live batch we dropped, not yet seen as a gap
        while sent < 1000:
            rounds += 1
            if chaos and rounds % 9 == 0:  # engine process restart between rounds
                await fleet.restart_engine(rng.choice(fleet.engines).name)
            if chaos and rounds % 7 == 0:  # drop the next live batch of one source
                e, r, sid = rng.choice(sources)
                seq = (await state(e))["ranks"][r]["seq"]
                r_ = await client.post(e.url + "/sim/faults", json={"rank": r, "drop_next": 1})
                assert r_.status_code == 200
                dropped_seq[sid] = -1 if seq is None else seq + 1
            n = min(rng.randrange(1, 30), 1000 - sent)
            await asyncio.gather(*(one() for _ in range(n)))
            sent += n
            if not reset_done and sent >= 500:
                for e in fleet.engines:
                    assert (await client.post(e.url + "/reset_prefix_cache")).status_code == 200
                reset_done = True
                continue  # the AllBlocksCleared goes out with each rank's next step
            # -- quiet point: nothing in flight; every published seq applied
            states = {e.name: await state(e) for e in fleet.engines}
            for e, r, sid in sources:
                rank = states[e.name]["ranks"][r]
                assert rank["running"] == 0 and rank["waiting"] == 0
                if rank["pending_events"]:
                    continue  # a reset this idle rank has not announced yet (vLLM does the same)
                if sid in dropped_seq:
                    if rank["seq"] is None or rank["seq"] <= dropped_seq[sid]:
                        continue  # the dropped batch is the newest: no gap is visible yet
                    del dropped_seq[sid]
                expected = {truth.to_local[_hash(b["hash"])] for b in rank["cached"]}
                got = await _settled(mgr, index, sid, rank["seq"], expected, patient=chaos)
                assert got == expected, (
                    f"{sid} after {sent} requests: index lacks {len(expected - got)}, "
                    f"has {len(got - expected)} extra"
                )
                assert not index.is_stale(sid)
                compared += 1
                if reset_done:
                    compared_after_reset[str(sid)] += 1
        evictions = sum(
            n for (_, kind), n in index.counters.applied.items() if kind == "BlockRemoved"
        )
        drops = {reason for (_, reason), n in index.counters.dropped.items() if n}
        # no orphans or malformed events; replay overlap (duplicate seqs) only under chaos
        assert drops <= ({"duplicate"} if chaos else set()), index.counters.dropped
        assert evictions > 100, "the run should evict (small pool)"
        assert compared > 100
        assert all(n > 0 for n in compared_after_reset.values()), compared_after_reset
        assert not any(s.stale for s in mgr.status())
        if chaos:  # the faults really happened and were healed by replay and resets
            assert _total(stack.metrics, "kvroute_seq_gaps_total") > 0
            assert _total(stack.metrics, "kvroute_source_resets_total") > 0
    finally:
        await client.aclose()
        await mgr.close()
        await fleet.close()
