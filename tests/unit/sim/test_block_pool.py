"""Block pool and scheduler of the simulator against hand-computed cases."""

from __future__ import annotations

import hashlib

import pytest

from kvroute.events.vllm_events import (
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
)
from kvroute.sim.block_pool import NONE_DIGEST, BlockPool
from kvroute.sim.scheduler import SchedulerConfig, SimRequest, SimScheduler


def ref_digest(parent: bytes, tokens: list[int], lora: str | None = None) -> bytes:
    """The documented hash, written out independently: sha256(parent || u32be tokens [|| lora])."""
    data = parent + b"".join(t.to_bytes(4, "big") for t in tokens)
    if lora is not None:
        data += b"\x00lora\x00" + lora.encode()
    return hashlib.sha256(data).digest()


def u64(d: bytes) -> int:
    return int.from_bytes(d[-8:], "big")


def chain(tokens: list[int], bs: int, lora: str | None = None) -> list[bytes]:
    out, parent = [], NONE_DIGEST
    for i in range(len(tokens) // bs):
        parent = ref_digest(parent, tokens[i * bs : (i + 1) * bs], lora)
        out.append(parent)
    return out


def sched(**kw: object) -> SimScheduler:
    cfg = {"block_size": 2, "num_gpu_blocks": 8, "max_num_seqs": 4,
           "prefill_tok_per_s": 1000.0, "decode_step_s": 0.01}  # fmt: skip
    cfg.update(kw)
    return SimScheduler(SchedulerConfig(**cfg))  # type: ignore[arg-type]


def req(
    rid: str, prompt: list[int], out: list[int], arrival: float = 0.0, **kw: object
) -> SimRequest:
    return SimRequest(rid, prompt, out, arrival, **kw)  # type: ignore[arg-type]


def run_all(s: SimScheduler) -> list[list[object]]:
    """Step until idle; the events of each step."""
    steps = []
    while (out := s.step()) is not None:
        steps.append(list(out.events))
    return steps


# -- block pool ------------------------------------------------------------------------------


def test_chain_digests_match_the_documented_hash() -> None:
    pool = BlockPool(4, 2)
    assert pool.chain_digests([1, 2, 3, 4, 5], None) == chain([1, 2, 3, 4, 5], 2)
    assert pool.chain_digests([1, 2], "ad") == chain([1, 2], 2, "ad")
    assert pool.chain_digests([1, 2], "ad") != pool.chain_digests([1, 2], None)
    assert pool.external(chain([1, 2], 2)[0]) == u64(chain([1, 2], 2)[0])
    assert BlockPool(4, 2, bytes_hashes=True).external(chain([1, 2], 2)[0]) == chain([1, 2], 2)[0]


def test_lru_eviction_takes_free_queue_head_and_tail_of_a_sequence_first() -> None:
    pool = BlockPool(4, 2)
    a = pool.allocate(2)  # blocks 0, 1
    assert a == [0, 1]
    d = chain([1, 2, 3, 4], 2)
    pool.cache(a, d, None, [1, 2, 3, 4])
    stored = pool.drain_events()
    assert stored == [VllmBlockStored([u64(d[0]), u64(d[1])], None, [1, 2, 3, 4], 2, None, "GPU",
                                      None, group_idx=0)]  # fmt: skip
    pool.free(list(reversed(a)))  # free queue: 2, 3, 1, 0
    assert pool.num_free == 4 and pool.num_cached == 2
    b = pool.allocate(3)  # 2, 3 are empty; 1 holds d[1] and is evicted
    assert b == [2, 3, 1]
    assert pool.drain_events() == [VllmBlockRemoved([u64(d[1])], "GPU", 0)]
    assert pool.is_cached(d[0]) and not pool.is_cached(d[1])
    pool.allocate(1)  # block 0: evicts d[0]
    assert pool.drain_events() == [VllmBlockRemoved([u64(d[0])], "GPU", 0)]
    with pytest.raises(ValueError):
        pool.allocate(1)


def test_touch_takes_cached_free_block_out_of_the_eviction_queue() -> None:
    pool = BlockPool(2, 2)
    ids = pool.allocate(1)
    d = chain([7, 8], 2)
    pool.cache(ids, d, None, [7, 8])
    pool.free(ids)
    assert pool.touch(d) == ids and pool.num_free == 1
    pool.allocate(1)  # the other (empty) block; nothing evicted
    pool.drain_events()
    with pytest.raises(ValueError):
        pool.allocate(1)
    pool.free(ids)
    pool.allocate(1)
    assert pool.drain_events() == [VllmBlockRemoved([u64(d[0])], "GPU", 0)]


def test_a_hash_cached_twice_is_stored_and_removed_once_per_copy() -> None:
    pool = BlockPool(2, 2)
    d = chain([1, 2], 2)
    stored = VllmBlockStored([u64(d[0])], None, [1, 2], 2, None, "GPU", None, group_idx=0)
    first, second = pool.allocate(1), pool.allocate(1)
    pool.cache(first, d, None, [1, 2])
    pool.cache(second, d, None, [1, 2])
    assert pool.drain_events() == [stored, stored]
    assert pool.num_cached == 1 and len(pool.cached_blocks()) == 2
    pool.free(second)
    pool.free(first)
    pool.allocate(1)  # evicts one copy: the hash stays cached
    assert pool.drain_events() == [VllmBlockRemoved([u64(d[0])], "GPU", 0)]
    assert pool.is_cached(d[0])
    pool.allocate(1)
    assert pool.drain_events() == [VllmBlockRemoved([u64(d[0])], "GPU", 0)]
    assert not pool.is_cached(d[0])


def test_reset_prefix_cache_refused_while_blocks_are_in_use() -> None:
    pool = BlockPool(2, 2)
    ids = pool.allocate(1)
    pool.cache(ids, chain([1, 2], 2), None, [1, 2])
    pool.drain_events()
    assert pool.reset_prefix_cache() is False
    pool.free(ids)
    assert pool.reset_prefix_cache() is True
    assert pool.drain_events() == [VllmAllBlocksCleared()]
    assert pool.num_cached == 0 and pool.cached_blocks() == []


# -- scheduler: events per step ----------------------------------------------------------------


def test_events_per_step_cover_prompt_and_generated_blocks_with_parents() -> None:
    s = sched()
    prompt, out = [11, 12, 13, 14, 15], [21, 22, 23, 24]
    s.add(req("a", prompt, out))
    d = chain([*prompt, *out[:3]], 2)  # computed tokens: prompt + 3 fed-back outputs
    steps = run_all(s)
    assert steps == [
        [VllmBlockStored([u64(d[0]), u64(d[1])], None, [11, 12, 13, 14], 2, None, "GPU", None,
                         group_idx=0)],
        [VllmBlockStored([u64(d[2])], u64(d[1]), [15, 21], 2, None, "GPU", None, group_idx=0)],
        [],
        [VllmBlockStored([u64(d[3])], u64(d[2]), [22, 23], 2, None, "GPU", None, group_idx=0)],
    ]  # fmt: skip
    cached = {b.hash: b.parent for b in s.pool.cached_blocks()}
    assert cached == {u64(d[0]): None, u64(d[1]): u64(d[0]), u64(d[2]): u64(d[1]),
                      u64(d[3]): u64(d[2])}  # fmt: skip


def test_lora_blocks_carry_name_and_id_and_hash_apart() -> None:
    s = sched()
    s.add(req("a", [1, 2, 3], [9], lora_name="sql", lora_id=1))
    out = s.step()
    assert out is not None
    d = chain([1, 2], 2, "sql")
    assert out.events == [
        VllmBlockStored([u64(d[0])], None, [1, 2], 2, 1, "GPU", "sql", group_idx=0)
    ]
    assert s.pool.cached_blocks()[0].lora_name == "sql"


def test_prefix_reuse_and_whole_prompt_hit_reuses_at_most_len_minus_one() -> None:
    s = sched()
    s.add(req("a", [1, 2, 3, 4, 5], [6]))
    run_all(s)
    b = req("b", [1, 2, 3, 4, 5], [6])  # blocks [1,2],[3,4] cached; 4 <= 5-1
    c = req("c", [1, 2, 3, 4], [6])  # whole prompt cached: only 1 block (<= 3 tokens) counts
    d = req("d", [1, 2, 9, 9, 9], [6])  # first block only
    for r in (b, c, d):
        s.add(r)
        run_all(s)
    assert (b.cached_tokens, c.cached_tokens, d.cached_tokens) == (4, 2, 2)
    assert s.prefix_hit_tokens == 8 and s.prefix_queries_tokens == 19


def test_identical_prompts_admitted_in_one_step_store_two_copies() -> None:
    s = sched()
    s.add(req("a", [1, 2, 3, 4], [5]))
    s.add(req("b", [1, 2, 3, 4], [5]))
    out = s.step()
    assert out is not None and len(out.advanced) == 2
    d = chain([1, 2, 3, 4], 2)
    stored = VllmBlockStored([u64(d[0]), u64(d[1])], None, [1, 2, 3, 4], 2, None, "GPU", None,
                             group_idx=0)  # fmt: skip
    assert out.events == [stored, stored]


def test_whole_prompt_hit_recomputes_the_last_block_as_a_second_copy() -> None:
    s = sched()
    s.add(req("a", [1, 2, 3, 4], [5]))
    run_all(s)
    b = req("b", [1, 2, 3, 4], [5, 6])
    s.add(b)
    out = s.step()
    assert out is not None and b.cached_tokens == 2
    d = chain([1, 2, 3, 4], 2)
    assert out.events == [
        VllmBlockStored([u64(d[1])], u64(d[0]), [3, 4], 2, None, "GPU", None, group_idx=0)
    ]
    assert sorted(x.hash for x in s.pool.cached_blocks()) == sorted(
        [u64(d[0]), u64(d[1]), u64(d[1])]
    )


def test_eviction_events_precede_stores_in_a_step() -> None:
    s = sched(num_gpu_blocks=2)
    s.add(req("a", [1, 2, 3, 4], [5]))
    run_all(s)  # a's two blocks cached, then freed
    s.add(req("b", [7, 8, 9, 10], [5]))
    out = s.step()
    assert out is not None
    da, db = chain([1, 2, 3, 4], 2), chain([7, 8, 9, 10], 2)
    # freed last-block-first, so a's second block is evicted first
    assert out.events == [
        VllmBlockRemoved([u64(da[1])], "GPU", 0),
        VllmBlockRemoved([u64(da[0])], "GPU", 0),
        VllmBlockStored([u64(db[0]), u64(db[1])], None, [7, 8, 9, 10], 2, None, "GPU", None,
                        group_idx=0),
    ]  # fmt: skip


def test_reset_prefix_cache_is_announced_with_the_next_step() -> None:
    s = sched()
    s.add(req("a", [1, 2, 3], [4, 5]))
    s.step()
    assert s.reset_prefix_cache() is False  # a holds blocks
    run_all(s)
    assert s.reset_prefix_cache() is True
    assert s.pool.cached_blocks() == []
    s.add(req("b", [1, 2, 3], [4]))
    out = s.step()
    assert out is not None and out.events[0] == VllmAllBlocksCleared()
    assert isinstance(out.events[1], VllmBlockStored) and out.events[1].parent_block_hash is None


def test_restart_empties_pool_and_loses_requests_without_all_blocks_cleared() -> None:
    s = sched()
    s.add(req("a", [1, 2, 3, 4, 5], [6]))
    run_all(s)
    running = req("b", [1, 2, 3, 4, 5], [6, 7, 8])
    s.add(running)
    s.step()
    lost = s.restart()
    assert lost == [running] and running.aborted
    assert s.pool.cached_blocks() == [] and s.pool.num_free == s.pool.num_blocks
    assert s.step() is None
    again = req("c", [1, 2, 3, 4, 5], [6])
    s.add(again)
    out = s.step()
    assert out is not None and again.cached_tokens == 0
    assert all(isinstance(e, VllmBlockStored) for e in out.events)


def test_admission_waits_for_blocks_and_max_num_seqs() -> None:
    s = sched(num_gpu_blocks=3, max_num_seqs=4)
    a = req("a", [1, 2, 3, 4], [5, 6])  # needs ceil(5/2) = 3 blocks
    b = req("b", [7, 8, 9, 10], [5, 6])
    s.add(a)
    s.add(b)
    s.step()
    assert s.num_running == 1 and s.num_waiting == 1
    run_all(s)
    assert a.finish_time is not None and b.first_token_time is not None
    assert b.first_token_time > a.finish_time
    with pytest.raises(ValueError):
        s.add(req("big", list(range(1, 8)), [1]))  # 4 blocks > 3


def test_abort_frees_blocks() -> None:
    s = sched()
    a = req("a", [1, 2, 3, 4, 5], [6, 7, 8])
    s.add(a)
    s.step()
    assert s.pool.num_used == 3
    s.abort(a)
    assert s.pool.num_used == 0 and not s.has_work()


# -- scheduler: time model ---------------------------------------------------------------------


def test_ttft_is_queueing_plus_uncached_prefill_time() -> None:
    s = sched(max_num_seqs=1)
    a = req("a", [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3], arrival=1.0)
    b = req("b", [1, 2, 3, 4, 5, 6, 9, 9], [1], arrival=1.0)
    s.add(a)
    s.add(b)
    run_all(s)
    # a: 8 tokens at 1000 tok/s + 10 ms decode step; then two decode steps of 10 ms.
    assert a.ttft == pytest.approx(0.008 + 0.01)
    assert a.e2e == pytest.approx(0.018 + 0.02)
    # b waits for a (max_num_seqs=1), then prefills only its 2 uncached tokens (6 cached).
    assert b.cached_tokens == 6
    assert b.ttft == pytest.approx(a.e2e + 0.002 + 0.01)


def test_idle_engine_jumps_to_the_next_arrival() -> None:
    s = sched()
    s.add(req("a", [1, 2], [3], arrival=5.0))
    out = s.step()
    assert out is not None and out.start == 5.0
    assert out.end == pytest.approx(5.0 + 0.002 + 0.01)


def test_request_validation() -> None:
    s = sched()
    with pytest.raises(ValueError):
        s.add(req("empty", [], [1]))
    with pytest.raises(ValueError):
        s.add(req("no-output", [1], []))
    with pytest.raises(ValueError):
        s.add(req("huge-id", [1, 1 << 32], [1]))
    assert not s.has_work()
