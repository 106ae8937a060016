"""The sync prefix index: which engine source holds which chained prefix block."""

from kvroute.index.hashing import chain_hashes, pack_tokens, prompt_hashes, seed_hash
from kvroute.index.prefix_index import GPU, IndexLimits, PrefixIndex
from kvroute.index.types import LocalHash, MatchResult, SourceId, source_id, split_source_id

__all__ = [
    "GPU",
    "IndexLimits",
    "LocalHash",
    "MatchResult",
    "PrefixIndex",
    "SourceId",
    "chain_hashes",
    "pack_tokens",
    "prompt_hashes",
    "seed_hash",
    "source_id",
    "split_source_id",
]
