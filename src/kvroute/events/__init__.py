"""The wire: decode vLLM KV-event batches, subscribe to engine sources, and publish like vLLM."""

from kvroute.events.publisher import (
    SUPPORTED_RELEASES,
    ZmqEventPublisher,
    encode_batch,
    release_layout,
)
from kvroute.events.replay import END_SEQ, ReplayResult, parse_replay_frames, request_replay
from kvroute.events.subscriber import SourceSpec, SourceStatus, SubscriberManager
from kvroute.events.wire import (
    AllBlocksCleared,
    BatchDecoder,
    BlockRemoved,
    BlockStored,
    EngineHash,
    Event,
    EventBatch,
    decode_batch,
    parse_live_frames,
)

__all__ = [
    "END_SEQ",
    "SUPPORTED_RELEASES",
    "AllBlocksCleared",
    "BatchDecoder",
    "BlockRemoved",
    "BlockStored",
    "EngineHash",
    "Event",
    "EventBatch",
    "ReplayResult",
    "SourceSpec",
    "SourceStatus",
    "SubscriberManager",
    "ZmqEventPublisher",
    "decode_batch",
    "encode_batch",
    "parse_live_frames",
    "parse_replay_frames",
    "release_layout",
    "request_replay",
]
