"""The trace bench's `oracle`: kv_aware fed by what the simulated engines' block pools hold right
now instead of by their KV events: what perfect event sync would route like."""

# The gateway's index is swapped for `OracleIndex` (through `create_app(index_factory=...)`), so
# the oracle runs the same gateway, policy, load accounting and proxy as kv_aware. Only the
# confirmed part of each match changes: it is read from the pools (no event delay, no missed or
# stale event); speculative blocks (prompts routed but not yet scheduled, which no pool holds
# yet) extend it from the index's own entries, added and expired as in a kv_aware run. The
# oracle is exact about the engines now, not clairvoyant: kv_aware's cost also weighs load, and
# one different choice changes every later cache state, so on a given run it can hit the cache
# less often than kv_aware (tests/e2e/bench/test_trace.py; README "Trace replay").

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from kvroute.core import GPU, EventCounters, LocalHash, MatchResult
from kvroute.index import IndexLimits, PrefixIndex, chain_hashes, seed_hash
from kvroute.sim import BlockPool, SimFleet

__all__ = ["ORACLE", "OracleIndex", "fleet_pools", "oracle_index_factory"]

ORACLE = "oracle"
"""The oracle's name in `--policies` and in trace.json."""

Pools = Callable[[], Mapping[str, Sequence[BlockPool]]]
"""Engine name -> the block pool of each of its DP ranks, read at every match (a restarted
engine gets new pools)."""


def fleet_pools(fleet: SimFleet) -> Pools:
    """The pools of `fleet`'s engines as they are at each call."""

    def pools() -> dict[str, list[BlockPool]]:
        return {e.name: [r.scheduler.pool for r in e.all_ranks()] for e in fleet.engines}

    return pools


class OracleIndex(PrefixIndex):
    """A `PrefixIndex` whose `match` reports, per engine, the longest prompt prefix one of its
    DP ranks holds in its block pool (GPU blocks, as the simulator has no other medium), plus
    the speculative blocks this index keeps from routed requests. Everything else (event
    ingest, speculative entries, staleness) is the pure-Python reference index's."""

    def __init__(
        self,
        pools: Pools,
        limits: IndexLimits | None = None,
        *,
        counters: EventCounters | None = None,
    ) -> None:
        super().__init__(limits, counters=counters)
        self._pools = pools

    def match(
        self,
        model: str,
        lora: str | None,
        token_ids: Sequence[int],
        *,
        cache_salt: str | None = None,
    ) -> dict[str, MatchResult]:
        # The reference match purges expired speculative entries; its result is not used: its
        # `speculative_blocks` start from the blocks the *events* confirmed (matching.py), which
        # would bring the index's view back in. The walk below starts from the pools' instead.
        super().match(model, lora, token_ids, cache_salt=cache_salt)
        now = self._clock()
        spec_by_engine = self._spec_by_engine  # the reference index's own (index/speculative.py)
        seed = seed_hash(model, lora, cache_salt)
        out: dict[str, MatchResult] = {}
        digests: dict[int, list[bytes]] = {}  # block size -> the prompt's engine digests
        local: dict[int, list[LocalHash]] = {}  # block size -> the prompt's local hashes
        for engine, pools in self._pools().items():
            if not pools:
                continue
            held, size = 0, pools[0].block_size
            for pool in pools:
                # The simulator's hash ignores cache_salt: a salted prompt hits unsalted blocks.
                chain = digests.get(pool.block_size)
                if chain is None:
                    chain = digests[pool.block_size] = pool.chain_digests(token_ids, lora)
                blocks = pool.cached_prefix(chain)
                if blocks > held:
                    held, size = blocks, pool.block_size
            spec = held
            entries = spec_by_engine.get(engine)
            if entries:
                hashes = local.get(size)
                if hashes is None:
                    hashes = local[size] = chain_hashes(seed, token_ids, size)
                while spec < len(hashes) and entries.get(hashes[spec], 0.0) > now:
                    spec += 1
            if held == 0 and spec == 0:
                continue
            out[engine] = MatchResult(
                blocks=held,
                tokens=held * size,
                by_medium={GPU: held} if held else {},
                speculative_blocks=spec if spec > held else 0,
                block_size=size,
            )
        return out


def oracle_index_factory(fleet: SimFleet) -> Callable[[IndexLimits, EventCounters], PrefixIndex]:
    """The gateway's `index_factory` (gateway/app.py) for an oracle over `fleet`."""
    pools = fleet_pools(fleet)

    def make(limits: IndexLimits, counters: EventCounters) -> PrefixIndex:
        return OracleIndex(pools, limits, counters=counters)

    return make
