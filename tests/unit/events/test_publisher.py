"""events/publisher.py encode_batch: byte-exact per release; live/replay frame fixtures parsed."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from kvroute.core import EngineHash
from kvroute.errors import WireError
from kvroute.events.cli import batch_to_json
from kvroute.events.normalise import normalise_batch
from kvroute.events.publisher import SUPPORTED_RELEASES, encode_batch, release_layout
from kvroute.events.replay import END_SEQ, parse_replay_frames
from kvroute.events.vllm_events import (
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEvent,
    VllmEventBatch,
)
from kvroute.events.wire import decode_batch, decode_vllm, parse_live_frames
from tests.shared_fixtures import Scenario, expected_json, fixture_versions, frames, scenarios


def _hash(value: Any) -> EngineHash:
    return bytes.fromhex(value["hex"]) if isinstance(value, dict) else int(value)


def batch_from_expected(meaning: dict[str, Any]) -> VllmEventBatch:
    """The VllmEventBatch an expected.json scenario describes."""
    events: list[VllmEvent] = []
    for e in meaning["events"]:
        if e["type"] == "BlockStored":
            parent = e["parent_block_hash"]
            events.append(
                VllmBlockStored(
                    [_hash(h) for h in e["block_hashes"]],
                    None if parent is None else _hash(parent),
                    e["token_ids"],
                    e["block_size"],
                    e["lora_id"],
                    e["medium"],
                    e["lora_name"],
                    e["extra_keys"],
                    e["group_idx"],
                )
            )
        elif e["type"] == "BlockRemoved":
            events.append(
                VllmBlockRemoved([_hash(h) for h in e["block_hashes"]], e["medium"], e["group_idx"])
            )
        else:
            events.append(VllmAllBlocksCleared())
    return VllmEventBatch(meaning["ts"], events, meaning["data_parallel_rank"])


@pytest.mark.parametrize("scenario", scenarios(), ids=lambda s: s.id)
def test_encoder_reproduces_fixture_payload_byte_for_byte(scenario: Scenario) -> None:
    assert encode_batch(batch_from_expected(scenario.expected), scenario.version) == (
        scenario.payload
    )


@pytest.mark.parametrize("version", fixture_versions())
def test_encoder_models_release_field_lists(version: str) -> None:
    meta = expected_json(version)
    stored = VllmBlockStored([1], None, [1], 1, None, "GPU", None, None, 0)
    raw = msgspec.msgpack.decode(encode_batch(VllmEventBatch(1.0, [stored], 0), version))
    assert len(raw) == len(meta["batch_fields"])
    (event,) = raw[1]
    if meta["event_encoding"] == "array":
        assert event[0] == "BlockStored"
        assert len(event) == 1 + len(meta["block_stored_fields"])
    else:
        assert event["type"] == "BlockStored"
        assert set(event) - {"type"} <= set(meta["block_stored_fields"])


def test_map16_header_only_for_0_33_block_stored() -> None:
    stored = VllmBlockStored([1], None, [1], 1, None, "GPU", None, None, 0)
    for release, header in [("0.24.0", b"\x89"), ("0.30.0", b"\x89"), ("0.33.0", b"\xde\x00\x09")]:
        payload = encode_batch(VllmEventBatch(1.0, [stored], 0), release)
        assert payload[11:14].startswith(header), release  # after 93, cb+8, 91


def test_map_mode_omits_none_fields_with_defaults_only() -> None:
    stored = VllmBlockStored([1], None, [1], 1, None, None, None, None, None)
    raw = msgspec.msgpack.decode(encode_batch(VllmEventBatch(1.0, [stored], 0), "0.33.0"))
    assert list(raw[1][0]) == [
        "type",
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
    ]
    removed = msgspec.msgpack.decode(
        encode_batch(VllmEventBatch(1.0, [VllmBlockRemoved([1])], 0), "0.26.0")
    )
    assert removed[1][0] == {"type": "BlockRemoved", "block_hashes": [1], "medium": None}


def test_fields_a_release_lacks_are_not_sent() -> None:
    stored = VllmBlockStored([1], None, [1], 1, None, "GPU", "sql", None, 3, session_id="s")
    raw = msgspec.msgpack.decode(encode_batch(VllmEventBatch(1.0, [stored], 5), "0.9.0"))
    assert raw == [1.0, [["BlockStored", [1], None, [1], 1, None]]]
    raw = msgspec.msgpack.decode(encode_batch(VllmEventBatch(1.0, [stored], 5), "0.30.0"))
    assert raw[1][0]["session_id"] == "s" and raw[2] == 5


@pytest.mark.parametrize(
    ("release", "layout"),
    [
        ("0.9.0", "0.9.0"),
        ("0.9.1", "0.9.1"),
        ("0.9.2", "0.9.1"),
        ("0.10.1.1", "0.9.1"),
        ("0.10.2", "0.10.2"),
        ("0.13.0", "0.10.2"),
        ("0.19.1", "0.17.0"),
        ("0.23.1", "0.22.0"),
        ("0.24.0", "0.24.0"),
        ("0.25.0", "0.24.0"),
        ("0.28.0", "0.26.0"),
        ("0.32.0", "0.30.0"),
        ("0.33.0", "0.33.0"),
        ("0.33.1", "0.33.0"),
        ("v0.22.0", "0.22.0"),
        ("0.11.0rc1", "0.10.2"),
        ("0.33.0+cu128", "0.33.0"),
        ("0.9.2.post1", "0.9.1"),
    ],
)
def test_any_release_maps_to_the_layout_in_force(release: str, layout: str) -> None:
    assert release_layout(release) == layout


@pytest.mark.parametrize(
    "release", ["0.8.5", "0.34.0", "1.0.0", "latest", "", "0.x.0", "33", "0.9.0" + "1" * 40 + "!"]
)
def test_unknown_release_is_a_clear_value_error(release: str) -> None:
    with pytest.raises(ValueError, match="vLLM release: expected"):
        encode_batch(VllmEventBatch(1.0, []), release)


@pytest.mark.parametrize("release", SUPPORTED_RELEASES)
def test_every_release_round_trips_through_the_decoder(release: str) -> None:
    events: list[VllmEvent] = [
        VllmBlockStored([2**64 - 1, -5, b"\x01" * 32], 9, [1, 2, 3], 1, 4, "CPU", None, None, 0),
        VllmBlockRemoved([2**64 - 1], "GPU", 0),
        VllmAllBlocksCleared(),
    ]
    batch = VllmEventBatch(1700000000.5, events, 1)
    payload = encode_batch(batch, release)
    decoded = decode_vllm(payload)
    assert [type(e) for e in decoded.events] == [type(e) for e in events]
    stored = decoded.events[0]
    assert isinstance(stored, VllmBlockStored)
    assert stored.block_hashes == [2**64 - 1, -5, b"\x01" * 32]
    assert (stored.parent_block_hash, stored.token_ids, stored.block_size) == (9, [1, 2, 3], 1)
    assert stored.lora_id == 4
    assert decoded.data_parallel_rank == (None if release == "0.9.0" else 1)
    # The router's view of the same bytes: a LoRA known only by id is left out (counted).
    assert decode_batch(payload) == normalise_batch(decoded)
    assert decode_batch(payload).unsupported_events == 1


# --- frame fixtures -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", fixture_versions())
def test_live_frames_fixture(version: str) -> None:
    meta = expected_json(version)
    messages = frames(version, "live")
    assert len(messages) == len(meta["live"]["messages"])
    for message, want in zip(messages, meta["live"]["messages"], strict=True):
        topic, seq, payload = parse_live_frames(message)
        assert (topic, seq) == (meta["live"]["topic"].encode(), want["seq"])
        assert batch_to_json(decode_vllm(payload)) == meta["scenarios"][want["scenario"]]


@pytest.mark.parametrize("version", fixture_versions())
def test_replay_frames_fixture(version: str) -> None:
    meta = expected_json(version)
    messages = frames(version, "replay")
    *data, end = messages
    assert parse_replay_frames(end) is None
    assert end[-2] == END_SEQ and end[-1] == b""
    width = 4 if meta["replay"]["topic_frame"] else 3
    for message, want in zip(data, meta["replay"]["messages"], strict=True):
        assert len(message) == width
        item = parse_replay_frames(message)
        assert item is not None
        seq, payload = item
        assert seq == want["seq"]
        assert batch_to_json(decode_vllm(payload)) == meta["scenarios"][want["scenario"]]
        # Our publisher sends the same payload bytes for the same meaning.
        assert encode_batch(batch_from_expected(meta["scenarios"][want["scenario"]]), version) == (
            payload
        )


@pytest.mark.parametrize(
    "message",
    [[], [b""], [b"", b"x"], [b"", b"a", b"b", b"c", b"d"], [b"", b"\x00\x01", b"payload"]],
    ids=["empty", "delimiter-only", "one-frame", "too-many", "short-seq"],
)
def test_malformed_replay_frames_raise_wire_error(message: list[bytes]) -> None:
    with pytest.raises(WireError, match="expected"):
        parse_replay_frames(message)


@pytest.mark.parametrize(
    "message",
    [[], [b"kv", bytes(8)], [b"kv", bytes(8), b"p", b"x"], [b"kv", b"\x01", b"p"]],
    ids=["empty", "two-frames", "four-frames", "short-seq"],
)
def test_malformed_live_frames_raise_wire_error(message: list[bytes]) -> None:
    with pytest.raises(WireError, match="expected"):
        parse_live_frames(message)


def test_replay_frames_without_delimiter_are_accepted() -> None:
    # A REQ socket strips the delimiter.
    assert parse_replay_frames([(3).to_bytes(8, "big"), b"p"]) == (3, b"p")
    assert parse_replay_frames([b"kv", (3).to_bytes(8, "big"), b"p"]) == (3, b"p")
    assert parse_replay_frames([END_SEQ, b""]) is None
