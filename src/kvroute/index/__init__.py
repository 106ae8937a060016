"""The sync prefix index: which engine source holds which chained prefix block."""

from kvroute.index.types import LocalHash, MatchResult, SourceId, source_id, split_source_id

__all__ = ["LocalHash", "MatchResult", "SourceId", "source_id", "split_source_id"]
