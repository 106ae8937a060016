"""The wire: decode vLLM KV-event batches, track and subscribe to engine sources, publish like
vLLM (for the simulator and tests)."""

from kvroute.events.curve import (
    CurveClientKeys,
    CurveKeyPair,
    check_curve_key,
    curve_client,
    curve_server,
    load_curve_key_pair,
    load_curve_public_key,
    write_curve_key_pair,
)
from kvroute.events.normalise import normalise_batch
from kvroute.events.publisher import (
    SUPPORTED_RELEASES,
    ZmqEventPublisher,
    encode_batch,
    release_layout,
)
from kvroute.events.replay import END_SEQ, ReplayResult, parse_replay_frames, request_replay
from kvroute.events.subscriber import SubscriberManager
from kvroute.events.tracker import RecoveryTimings, ReplayKind, ReplayRequest, SourceTracker
from kvroute.events.vllm_events import (
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEvent,
    VllmEventBatch,
)
from kvroute.events.wire import BatchDecoder, decode_batch, decode_vllm, parse_live_frames

__all__ = [
    "END_SEQ",
    "SUPPORTED_RELEASES",
    "BatchDecoder",
    "CurveClientKeys",
    "CurveKeyPair",
    "RecoveryTimings",
    "ReplayKind",
    "ReplayRequest",
    "ReplayResult",
    "SourceTracker",
    "SubscriberManager",
    "VllmAllBlocksCleared",
    "VllmBlockRemoved",
    "VllmBlockStored",
    "VllmEvent",
    "VllmEventBatch",
    "ZmqEventPublisher",
    "check_curve_key",
    "curve_client",
    "curve_server",
    "decode_batch",
    "decode_vllm",
    "encode_batch",
    "load_curve_key_pair",
    "load_curve_public_key",
    "normalise_batch",
    "parse_live_frames",
    "parse_replay_frames",
    "release_layout",
    "request_replay",
    "write_curve_key_pair",
]
