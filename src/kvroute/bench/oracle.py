"""The trace bench's `oracle`: kv_aware fed by what the simulated engines' block pools hold right
now instead of by their KV events, an upper bound for what better event sync could route."""

# The gateway's index is swapped for `OracleIndex` (through `create_app(index_factory=...)`), so
# the oracle runs the same gateway, policy, load accounting and proxy as kv_aware. Only the
# confirmed part of each match changes: it is read from the pools (no event delay, no missed or
# stale event); the speculative part (prompts routed but not yet scheduled, which no pool holds
# yet) is the index's own, kept up by the same events as in a kv_aware run. The oracle is thus
# exact about the engines, not clairvoyant about the future: a policy that ignored load could
# hit the cache more often, at a worse TTFT.

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from kvroute.core import GPU, EventCounters, MatchResult
from kvroute.index import IndexLimits, PrefixIndex
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
        # The simulator's hash ignores cache_salt: a salted prompt hits an unsalted prefix there.
        speculative = super().match(model, lora, token_ids, cache_salt=cache_salt)
        out: dict[str, MatchResult] = {}
        chains: dict[int, list[bytes]] = {}  # block size -> the prompt's digests
        for engine, pools in self._pools().items():
            held, size = 0, 0
            for pool in pools:
                chain = chains.get(pool.block_size)
                if chain is None:
                    chain = chains[pool.block_size] = pool.chain_digests(token_ids, lora)
                blocks = pool.cached_prefix(chain)
                if blocks >= held:
                    held, size = blocks, pool.block_size
            spec = speculative.get(engine)
            spec_blocks = spec.speculative_blocks if spec is not None else 0
            if held == 0 and spec_blocks == 0:
                continue
            out[engine] = MatchResult(
                blocks=held,
                tokens=held * size,
                by_medium={GPU: held} if held else {},
                speculative_blocks=spec_blocks,
                block_size=size or (spec.block_size if spec is not None else 0),
            )
        return out


def oracle_index_factory(fleet: SimFleet) -> Callable[[IndexLimits, EventCounters], PrefixIndex]:
    """The gateway's `index_factory` (gateway/app.py) for an oracle over `fleet`."""
    pools = fleet_pools(fleet)

    def make(limits: IndexLimits, counters: EventCounters) -> PrefixIndex:
        return OracleIndex(pools, limits, counters=counters)

    return make
