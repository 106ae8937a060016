"""The sync prefix index: which engine source holds which chained prefix block."""

from kvroute.index.hashing import chain_hashes, pack_tokens, prompt_hashes, seed_hash
from kvroute.index.impl import create_index
from kvroute.index.limits import IndexLimits
from kvroute.index.prefix_index import PrefixIndex

__all__ = [
    "IndexLimits",
    "PrefixIndex",
    "chain_hashes",
    "create_index",
    "pack_tokens",
    "prompt_hashes",
    "seed_hash",
]
