"""The vocabulary every package shares, free of vLLM's wire and of any I/O library: ids, the
normalised events, match results, counters and their labels (imports: stdlib and msgspec only)."""

from kvroute.core.counters import DropReason, EventCounters, ReplayOutcome, ResetCause
from kvroute.core.engine_client import EngineClient, EngineResponse
from kvroute.core.events import (
    GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
)
from kvroute.core.ids import EngineHash, LocalHash, SourceId, SourceSpec, source_id
from kvroute.core.ingest_limits import IngestLimits
from kvroute.core.load_source import LoadSource
from kvroute.core.match import MatchResult
from kvroute.core.policy_name import PolicyName
from kvroute.core.source_status import SourceStatus

__all__ = [
    "GPU",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "DropReason",
    "EngineClient",
    "EngineHash",
    "EngineResponse",
    "Event",
    "EventBatch",
    "EventCounters",
    "IngestLimits",
    "LoadSource",
    "LocalHash",
    "MatchResult",
    "PolicyName",
    "ReplayOutcome",
    "ResetCause",
    "SourceId",
    "SourceSpec",
    "SourceStatus",
    "source_id",
]
