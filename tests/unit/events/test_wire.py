"""events/wire.py: every fixture payload, each tolerance rule, and malformed input."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from kvroute.errors import WireError
from kvroute.events.cli import batch_to_json
from kvroute.events.wire import (
    AllBlocksCleared,
    BatchDecoder,
    BlockRemoved,
    BlockStored,
    EventBatch,
    decode_batch,
)
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
    assert batch_to_json(decode_batch(scenario.payload)) == scenario.expected


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
    batch = decode_batch(_pack([1.0, [_stored_array([7], None, [1, 2], 2, None)]]))
    (event,) = batch.events
    assert event == BlockStored([7], None, [1, 2], 2, None)
    assert event.medium is None and event.group_idx is None


def test_block_stored_array_with_only_hashes() -> None:
    batch = decode_batch(_pack([1.0, [["BlockStored", [7]]], 0]))
    assert batch.events == [BlockStored([7])]


def test_block_stored_array_with_extra_trailing_fields() -> None:
    fields = [[7], None, [1, 2], 2, None, "GPU", None, None, 0, None, None]
    batch = decode_batch(_pack([1.0, [_stored_array(*fields, "future", 42, [1])], 0]))
    assert batch.events == [BlockStored([7], None, [1, 2], 2, None, "GPU", None, None, 0)]


def test_block_removed_array_with_extra_trailing_fields() -> None:
    batch = decode_batch(_pack([1.0, [["BlockRemoved", [7], "GPU", 0, "LOCAL", "x"]], 0]))
    assert batch.events == [BlockRemoved([7], "GPU", 0)]


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
    batch = decode_batch(_pack([1.0, [event], 0]))
    (got,) = batch.events
    assert isinstance(got, BlockStored)
    assert (got.block_hashes, got.medium, got.locality, got.session_id) == (
        [7],
        "GPU",
        "LOCAL",
        "s",
    )


def test_map_event_with_unknown_future_key_only_known_to_tolerant_path() -> None:
    batch = decode_batch(_pack([1.0, [{"type": "BlockRemoved", "block_hashes": [7], "x": 1}], 0]))
    assert batch.events == [BlockRemoved([7])]


def test_outer_batch_of_two_items_has_no_rank() -> None:
    batch = decode_batch(_pack([2.5, [["AllBlocksCleared"]]]))
    assert batch == EventBatch(2.5, [AllBlocksCleared()], None)


def test_outer_batch_of_three_items_has_rank() -> None:
    batch = decode_batch(_pack([2.5, [["AllBlocksCleared"]], 3]))
    assert batch == EventBatch(2.5, [AllBlocksCleared()], 3)


def test_outer_batch_with_extra_items_ignores_them() -> None:
    batch = decode_batch(_pack([2.5, [{"type": "AllBlocksCleared"}], 1, "extra"]))
    assert batch == EventBatch(2.5, [AllBlocksCleared()], 1)


def test_map_shaped_outer_batch_is_accepted() -> None:
    payload = _pack({"ts": 3.0, "events": [["BlockRemoved", [5]]], "data_parallel_rank": 2})
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
    array = _pack([1.0, [["BlockRemoved", [1], medium]], 0])
    map_ = _pack([1.0, [{"type": "BlockStored", "block_hashes": [1], "medium": medium}], 0])
    (removed,) = decode_batch(array).events
    (stored,) = decode_batch(map_).events
    assert isinstance(removed, BlockRemoved) and isinstance(stored, BlockStored)
    assert removed.medium == stored.medium == medium.upper()


def test_extra_keys_tuples_come_back_as_lists() -> None:
    fields = [[7], None, [1, 2], 2, None, "GPU", "sql", [["sql", "salt"]], 0]
    (event,) = decode_batch(_pack([1.0, [_stored_array(*fields)], 0])).events
    assert isinstance(event, BlockStored)
    assert event.extra_keys == [["sql", "salt"]] and event.lora_name == "sql"


def test_int_ts_is_accepted_as_float() -> None:
    batch = decode_batch(_pack([7, [], 0]))
    assert batch.ts == 7.0 and isinstance(batch.ts, float)


def test_empty_events_list() -> None:
    assert decode_batch(_pack([1.0, [], 0])) == EventBatch(1.0, [], 0)


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


def test_wire_error_names_the_event_index() -> None:
    payload = _pack([1.0, [["AllBlocksCleared"], ["BlockRemoved", "x"]], 0])
    with pytest.raises(WireError, match=r"events\[1\] BlockRemoved"):
        decode_batch(payload)
