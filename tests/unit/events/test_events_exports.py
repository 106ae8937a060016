"""kvroute.events exports exactly its documented surface."""

from __future__ import annotations

import kvroute.events


def test_events_all_is_the_public_surface() -> None:
    assert sorted(kvroute.events.__all__) == sorted(
        [
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
    )
    for name in kvroute.events.__all__:
        assert getattr(kvroute.events, name) is not None
