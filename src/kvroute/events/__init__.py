"""The wire: decode vLLM KV-event batches, subscribe to engine sources, and publish like vLLM."""

from kvroute.events.wire import (
    AllBlocksCleared,
    BatchDecoder,
    BlockRemoved,
    BlockStored,
    EngineHash,
    Event,
    EventBatch,
    decode_batch,
)

__all__ = [
    "AllBlocksCleared",
    "BatchDecoder",
    "BlockRemoved",
    "BlockStored",
    "EngineHash",
    "Event",
    "EventBatch",
    "decode_batch",
]
