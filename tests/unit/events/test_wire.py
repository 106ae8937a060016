"""events/wire.py: every fixture payload, each tolerance rule, and malformed input.

`decode_vllm` gives every field as sent (what expected.json describes); `decode_batch` and
`BatchDecoder` give the router's core events, which must be `normalise_batch(decode_vllm(...))`.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from kvroute.core import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from kvroute.errors import WireError
from kvroute.events import (
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEventBatch,
    encode_batch,
    normalise_batch,
)
from kvroute.events.cli import batch_to_json
from kvroute.events.wire import BatchDecoder, decode_batch, decode_vllm
from tests.shared_fixtures import Scenario, scenarios

H_BIG = 2**64 - 2  # uint64 above 2^63 (sent as msgpack uint 64)
H_NEG = -(2**63)  # Python hash() in <= 0.10.1 is signed and may be negative


def _pack(obj: Any) -> bytes:
    return msgspec.msgpack.encode(obj)


def _stored_array(*fields: Any) -> list[Any]:
    return ["BlockStored", *fields]


# --- fixtures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", scenarios(), ids=lambda s: s.id)
def test_fixture_payload_decodes_to_expected_meaning(scenario: Scenario) -> None:
    assert batch_to_json(decode_vllm(scenario.payload)) == scenario.expected


@pytest.mark.parametrize("scenario", scenarios(), ids=lambda s: s.id)
def test_decode_batch_is_the_normalised_vllm_batch_on_fixtures(scenario: Scenario) -> None:
    assert decode_batch(scenario.payload) == normalise_batch(decode_vllm(scenario.payload))


@pytest.mark.parametrize("scenario", scenarios(), ids=lambda s: s.id)
def test_batch_decoder_matches_decode_batch_on_fixtures(scenario: Scenario) -> None:
    decoder = BatchDecoder()
    # Twice: the second call takes the fast path learned by the first.
    assert decoder.decode(scenario.payload) == decode_batch(scenario.payload)
    assert decoder.decode(scenario.payload) == decode_batch(scenario.payload)


def test_batch_decoder_switches_between_shapes() -> None:
    array = _pack([1.0, [_stored_array([1], None, [1, 2], 2, None)], 0])
    map_ = _pack([1.0, [{"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU"}], 0])
    decoder = BatchDecoder()
    for payload in (array, map_, map_, array, array, map_):
        assert decoder.decode(payload) == decode_batch(payload)


# --- tolerance rules (one test each) ----------------------------------------------------------


def test_block_stored_array_with_missing_trailing_fields() -> None:
    # 0.9.0's five fields: medium, lora_name, group_idx ... default to None.
    payload = _pack([1.0, [_stored_array([7], None, [1, 2], 2, None)]])
    (raw,) = decode_vllm(payload).events
    assert raw == VllmBlockStored([7], None, [1, 2], 2, None)
    assert raw.medium is None and raw.group_idx is None and raw.lora_name is None
    (event,) = decode_batch(payload).events
    assert event == BlockStored([7], None, [1, 2], 2)
    assert event.medium is None and event.group_idx is None


def test_block_stored_array_with_only_hashes() -> None:
    payload = _pack([1.0, [["BlockStored", [7]]], 0])
    assert decode_vllm(payload).events == [VllmBlockStored([7])]
    assert decode_batch(payload).events == [BlockStored([7])]


def test_block_stored_array_with_extra_trailing_fields() -> None:
    fields = [[7], None, [1, 2], 2, None, "GPU", None, None, 0, None, None]
    payload = _pack([1.0, [_stored_array(*fields, "future", 42, [1])], 0])
    assert decode_vllm(payload).events == [
        VllmBlockStored([7], None, [1, 2], 2, None, "GPU", None, None, 0)
    ]
    assert decode_batch(payload).events == [BlockStored([7], None, [1, 2], 2, None, "GPU", 0)]


def test_block_removed_array_with_extra_trailing_fields() -> None:
    payload = _pack([1.0, [["BlockRemoved", [7], "GPU", 0, "LOCAL", "x"]], 0])
    assert decode_vllm(payload).events == [VllmBlockRemoved([7], "GPU", 0)]
    assert decode_batch(payload).events == [BlockRemoved([7], "GPU", 0)]


def test_map_event_with_unknown_keys_ignored() -> None:
    event = {
        "type": "BlockStored",
        "block_hashes": [7],
        "parent_block_hash": None,
        "token_ids": [1, 2],
        "block_size": 2,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "locality": "LOCAL",
        "session_id": "s",
        "some_future_field": {"a": [1, 2]},
    }
    payload = _pack([1.0, [event], 0])
    (raw,) = decode_vllm(payload).events
    assert isinstance(raw, VllmBlockStored)
    assert (raw.block_hashes, raw.medium, raw.locality, raw.session_id) == (
        [7],
        "GPU",
        "LOCAL",
        "s",
    )
    assert decode_batch(payload).events == [BlockStored([7], None, [1, 2], 2, None, "GPU")]


def test_map_event_with_unknown_future_key_only_known_to_tolerant_path() -> None:
    payload = _pack([1.0, [{"type": "BlockRemoved", "block_hashes": [7], "x": 1}], 0])
    assert decode_vllm(payload).events == [VllmBlockRemoved([7])]
    assert decode_batch(payload).events == [BlockRemoved([7])]


def test_outer_batch_of_two_items_has_no_rank() -> None:
    payload = _pack([2.5, [["AllBlocksCleared"]]])
    assert decode_vllm(payload) == VllmEventBatch(2.5, [VllmAllBlocksCleared()], None)
    assert decode_batch(payload) == EventBatch(2.5, [AllBlocksCleared()], None)


def test_outer_batch_of_three_items_has_rank() -> None:
    payload = _pack([2.5, [["AllBlocksCleared"]], 3])
    assert decode_vllm(payload) == VllmEventBatch(2.5, [VllmAllBlocksCleared()], 3)
    assert decode_batch(payload) == EventBatch(2.5, [AllBlocksCleared()], 3)


def test_outer_batch_with_extra_items_ignores_them() -> None:
    payload = _pack([2.5, [{"type": "AllBlocksCleared"}], 1, "extra"])
    assert decode_vllm(payload) == VllmEventBatch(2.5, [VllmAllBlocksCleared()], 1)
    assert decode_batch(payload) == EventBatch(2.5, [AllBlocksCleared()], 1)


def test_map_shaped_outer_batch_is_accepted() -> None:
    payload = _pack({"ts": 3.0, "events": [["BlockRemoved", [5]]], "data_parallel_rank": 2})
    assert decode_vllm(payload) == VllmEventBatch(3.0, [VllmBlockRemoved([5])], 2)
    assert decode_batch(payload) == EventBatch(3.0, [BlockRemoved([5])], 2)


@pytest.mark.parametrize(
    "unknown",
    [["BlockMoved", [1], 2], {"type": "BlockMoved", "block_hashes": [1]}],
    ids=["array", "map"],
)
def test_unknown_tag_is_skipped_and_counted(unknown: Any) -> None:
    payload = _pack([1.0, [unknown, ["AllBlocksCleared"], unknown], 0])
    batch = decode_batch(payload)
    assert batch.events == [AllBlocksCleared()]
    assert batch.skipped_events == 2
    assert BatchDecoder().decode(payload) == batch
    assert decode_vllm(payload) == VllmEventBatch(1.0, [VllmAllBlocksCleared()], 0, 2)


def test_negative_int64_hash() -> None:
    batch = decode_batch(_pack([1.0, [_stored_array([H_NEG, -1], -5, [1, 2, 3, 4], 2, None)]]))
    (event,) = batch.events
    assert isinstance(event, BlockStored)
    assert (event.block_hashes, event.parent_block_hash) == ([H_NEG, -1], -5)


def test_uint64_hash_above_2_pow_63() -> None:
    payload = _pack([1.0, [["BlockRemoved", [H_BIG, 2**63]]], 0])
    assert payload.count(b"\xcf") == 2  # msgpack uint 64
    assert decode_batch(payload).events == [BlockRemoved([H_BIG, 2**63])]


@pytest.mark.parametrize("size", [16, 32, 64, 96])
def test_bytes_hashes(size: int) -> None:
    h1, h2, parent = bytes([1]) * size, bytes([2]) * size, bytes([3]) * size
    event = {"type": "BlockStored", "block_hashes": [h1, h2], "parent_block_hash": parent}
    event |= {"token_ids": [1, 2], "block_size": 1, "lora_id": None, "medium": "GPU"}
    batch = decode_batch(_pack([1.0, [event, ["BlockRemoved", [h1], "GPU"]], 0]))
    stored, removed = batch.events
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == [h1, h2] and stored.parent_block_hash == parent
    assert removed == BlockRemoved([h1], "GPU")


@pytest.mark.parametrize("medium", ["cpu", "Cpu", "storage"])
def test_medium_is_upper_cased(medium: str) -> None:
    array_removed = _pack([1.0, [["BlockRemoved", [1], medium]], 0])
    array_stored = _pack([1.0, [_stored_array([1], None, [1], 1, None, medium)], 0])
    map_removed = _pack([1.0, [{"type": "BlockRemoved", "block_hashes": [1], "medium": medium}], 0])
    map_stored = _pack([1.0, [{"type": "BlockStored", "block_hashes": [1], "medium": medium}], 0])
    for payload in (array_removed, array_stored, map_removed, map_stored):
        (event,) = decode_batch(payload).events
        assert isinstance(event, BlockRemoved | BlockStored)
        assert event.medium == medium.upper()
        assert BatchDecoder().decode(payload) == decode_batch(payload)
        (raw,) = decode_vllm(payload).events  # vLLM's own meaning: as sent
        assert isinstance(raw, VllmBlockRemoved | VllmBlockStored)
        assert raw.medium == medium


def test_extra_keys_tuples_come_back_as_lists() -> None:
    fields = [[7], None, [1, 2], 2, None, "GPU", "sql", [["sql", "salt"]], 0]
    payload = _pack([1.0, [_stored_array(*fields)], 0])
    (raw,) = decode_vllm(payload).events
    assert isinstance(raw, VllmBlockStored)
    assert raw.extra_keys == [["sql", "salt"]] and raw.lora_name == "sql"
    (event,) = decode_batch(payload).events
    assert event == BlockStored([7], None, [1, 2], 2, "sql", "GPU", 0, "salt")


def test_int_ts_is_accepted_as_float() -> None:
    for batch in (decode_batch(_pack([7, [], 0])), decode_vllm(_pack([7, [], 0]))):
        assert batch.ts == 7.0 and isinstance(batch.ts, float)


def test_empty_events_list() -> None:
    assert decode_batch(_pack([1.0, [], 0])) == EventBatch(1.0, [], 0)
    assert decode_vllm(_pack([1.0, [], 0])) == VllmEventBatch(1.0, [], 0)


# --- malformed input: WireError saying expected vs got ----------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected", "got"),
    [
        (b"", "expected a msgpack KVEventBatch", "undecodable"),
        (b"\x93\xcb", "expected a msgpack KVEventBatch", "undecodable"),
        (b"\xc1", "expected a msgpack KVEventBatch", "undecodable"),
        (_pack(5), "expected array", "got int"),
        (_pack("x"), "expected array", "got str"),
        (_pack([1.0]), "expected an array of 2 or 3 items", "got 1"),
        (_pack(["soon", []]), "ts: expected float", "got str"),
        (_pack([1.0, {"a": 1}, 0]), "events: expected array", "got map"),
        (_pack([1.0, [], "zero"]), "data_parallel_rank: expected int or nil", "got str"),
        (_pack([1.0, [5], 0]), "expected array or map event", "got int"),
        (_pack([1.0, [[]], 0]), "expected array or map event", "got array"),
        (_pack([1.0, [[7, [1]]], 0]), "type: expected str", "got int"),
        (_pack([1.0, [{"block_hashes": [1]}], 0]), "type: expected str", "got nil"),
        (
            _pack([1.0, [_stored_array([1], None, [1], "four", None)], 0]),
            "block_size: expected int",
            "got str",
        ),
        (
            _pack([1.0, [{"type": "BlockStored", "block_hashes": "abc"}], 0]),
            "block_hashes: expected array",
            "got str",
        ),
        (
            _pack([1.0, [["BlockRemoved", [1.5]]], 0]),
            "expected int | bytes",
            "got float",
        ),
        (
            _pack([1.0, [["BlockRemoved", [1], 7]], 0]),
            "medium: expected str | null",
            "got int",
        ),
    ],
    ids=lambda v: v.hex()[:24] if isinstance(v, bytes) else None,
)
def test_malformed_payload_raises_wire_error_with_expected_and_got(
    payload: bytes, expected: str, got: str
) -> None:
    with pytest.raises(WireError) as info:
        decode_batch(payload)
    message = str(info.value)
    assert expected in message and got in message, message
    with pytest.raises(WireError):
        BatchDecoder().decode(payload)
    with pytest.raises(WireError) as info:
        decode_vllm(payload)
    assert expected in str(info.value) and got in str(info.value), str(info.value)


def test_wire_error_names_the_event_index() -> None:
    payload = _pack([1.0, [["AllBlocksCleared"], ["BlockRemoved", "x"]], 0])
    with pytest.raises(WireError, match=r"events\[1\] BlockRemoved"):
        decode_batch(payload)
    with pytest.raises(WireError, match=r"events\[1\] BlockRemoved"):
        decode_vllm(payload)


def test_plain_map_stores_compare_as_the_core_events_they_stand_for() -> None:
    # Plain-text map stores reach the index without a copy (wire.py `_MapBlockStored`); they
    # must still behave as core events for every caller.
    stored = VllmBlockStored([7], None, [1, 2], 2, extra_keys=[None])
    event = decode_batch(encode_batch(VllmEventBatch(1.0, [stored], 0))).events[0]
    core = BlockStored([7], None, [1, 2], 2)
    assert isinstance(event, BlockStored)
    assert event == core and core == event
    assert not (event != core) and not (core != event)  # noqa: SIM202 (the operator is the test)
    assert event != BlockStored([8], None, [1, 2], 2) and event != BlockRemoved([7])
    salted = VllmBlockStored([7], None, [1, 2], 2, extra_keys=[["salt"]])
    copied = decode_batch(encode_batch(VllmEventBatch(1.0, [salted], 0))).events[0]
    assert type(copied) is BlockStored and copied.cache_salt == "salt"
