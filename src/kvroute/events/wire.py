"""Decode one vLLM KV-event payload (frame 2 of a live message), of any release: into
`kvroute.core` events for the router (`BatchDecoder`), or vLLM's own meaning (`decode_vllm`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar, Final, TypeAlias

import msgspec

from kvroute.core import GPU, AllBlocksCleared, BlockRemoved, BlockStored, EngineHash, EventBatch
from kvroute.errors import WireError
from kvroute.events.normalise import normalise_batch, normalise_events
from kvroute.events.vllm_events import (
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEvent,
    VllmEventBatch,
)

__all__ = ["BatchDecoder", "decode_batch", "decode_vllm", "parse_live_frames"]

# --- positional (array) events, vLLM 0.9.0 – 0.23.x -----------------------------------------
#
# In array mode msgspec writes every declared field, so a release's arrays have a fixed length;
# fields were only ever appended. Missing trailing positions take the default (None), extra
# trailing positions are ignored (msgspec does both for array_like Structs).
# Pinned by test_block_stored_array_with_missing_trailing_fields and
# test_block_stored_array_with_extra_trailing_fields.
#
# BlockStored                               BlockRemoved
#  pos field                        since    pos field         since
#   0  tag "BlockStored"            0.9.0     0  tag           0.9.0
#   1  block_hashes  [int|bin]      0.9.0     1  block_hashes  0.9.0
#   2  parent_block_hash int|bin|nil 0.9.0    2  medium        0.10.2
#   3  token_ids [int]              0.9.0     3  group_idx     0.20.0
#   4  block_size int               0.9.0
#   5  lora_id int|nil              0.9.0   AllBlocksCleared: ["AllBlocksCleared"]
#   6  medium str|nil               0.10.2
#   7  lora_name str|nil            0.14.0  Outer batch (every release, always an array):
#   8  extra_keys [..]|nil          0.17.0    [ts, events]                      0.9.0
#   9  group_idx int|nil            0.20.0    [ts, events, data_parallel_rank]  0.9.1+
#  10  kv_cache_spec_kind str|nil   0.22.0
#  11  kv_cache_spec_sliding_window 0.22.0  From 0.24.0 events are maps {"type": tag, ...}
#                                            with unknown keys ignored (locality 0.26,
#                                            ownership 0.29, session_id 0.30, ...).
_STORED_POSITIONS: Final = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
)
_REMOVED_POSITIONS: Final = ("block_hashes", "medium", "group_idx")
_POSITIONS: Final[dict[str, tuple[str, ...]]] = {
    "BlockStored": _STORED_POSITIONS,
    "BlockRemoved": _REMOVED_POSITIONS,
    "AllBlocksCleared": (),
}
_VLLM_TYPES: Final[dict[str, type[VllmEvent]]] = {
    "BlockStored": VllmBlockStored,
    "BlockRemoved": VllmBlockRemoved,
    "AllBlocksCleared": VllmAllBlocksCleared,
}


class _ArrayBlockStored(msgspec.Struct, array_like=True, gc=False, tag="BlockStored"):
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None = None
    token_ids: list[int] | None = None
    block_size: int | None = None
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    # Array releases (<= 0.23) predate lookahead hashing (0.33); the normaliser reads it.
    lookahead_token_ids: ClassVar[None] = None


class _ArrayBlockRemoved(msgspec.Struct, array_like=True, gc=False, tag="BlockRemoved"):
    block_hashes: list[EngineHash]
    medium: str | None = None
    group_idx: int | None = None


class _ArrayAllBlocksCleared(msgspec.Struct, array_like=True, gc=False, tag="AllBlocksCleared"):
    pass


_ArrayEvent: TypeAlias = _ArrayBlockStored | _ArrayBlockRemoved | _ArrayAllBlocksCleared


class _ArrayEventBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[_ArrayEvent]
    data_parallel_rank: int | None = None


# Map events (0.24+) for the router decode straight into the core types; msgspec skips the keys
# nobody reads (kv_cache_spec_*, locality, ownership, session_id) without building them.
class _MapBlockStored(BlockStored, frozen=True, gc=False, tag="BlockStored"):
    """The core event plus the three vLLM fields its verdict reads. A plain-text store (the
    common case) goes to the index as is, which is typed against `BlockStored` and reads none of
    them: a copy per event cost up to 25% of decoding (docs/design.md §2); anything else is
    copied into a core event by `normalise_events`."""

    lora_id: int | None = None
    extra_keys: list[Any] | None = None
    lookahead_token_ids: list[list[int]] | None = None

    # Equal to the core event with the same core fields, both ways round (Python asks the
    # subclass first): callers compare decoded batches with core events (tests/unit/events).
    def __eq__(self, other: object) -> bool:
        if isinstance(other, BlockStored):
            return all(getattr(self, f) == getattr(other, f) for f in _CORE_STORED_FIELDS)
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal


_CORE_STORED_FIELDS: Final = BlockStored.__struct_fields__
_NIL: Final = msgspec.Raw(b"\xc0")


class _RawMapBlockStored(_MapBlockStored, frozen=True, gc=False, tag="BlockStored"):
    """`_MapBlockStored` with `token_ids` left as the msgpack bytes of the array, for an index
    that reads them itself (`PrefixIndex.raw_tokens`): creating a Python int per token id was
    the largest part of decoding (docs/design.md §2)."""

    token_ids: msgspec.Raw = _NIL  # type: ignore[assignment]


class _RawMapEventBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[_RawMapBlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


class _MapEventBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[_MapBlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


class _VllmMapEventBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[VllmEvent]
    data_parallel_rank: int | None = None


_map_decoder: Final = msgspec.msgpack.Decoder(_MapEventBatch)
_raw_map_decoder: Final = msgspec.msgpack.Decoder(_RawMapEventBatch)
_array_decoder: Final = msgspec.msgpack.Decoder(_ArrayEventBatch)
_vllm_map_decoder: Final = msgspec.msgpack.Decoder(_VllmMapEventBatch)
_untyped_decoder: Final = msgspec.msgpack.Decoder()
# RecursionError: msgspec skipping a deeply nested value it does not keep (extra_keys, raw token
# ids) can hit the recursion limit; pinned by test_deeply_nested_*.
_DECODE_ERRORS: Final = (msgspec.DecodeError, ValueError, RecursionError)


def _decode_map(payload: bytes) -> EventBatch:
    raw = _map_decoder.decode(payload)
    return _map_batch(raw.ts, raw.events, raw.data_parallel_rank, _MapBlockStored, None)


_Decode: TypeAlias = Callable[[bytes], EventBatch]


# What `_recv.take_run` needs to decode a payload of the raw map shape without a Python frame
# (events/tracker.py `on_live_run`): the msgspec decode, `batch_verdict`, its "plain" answer
# and `EventBatch`. Only a batch judged plain is taken that way, anything else is decoded again
# by `BatchDecoder.decode` (design §12).
PlainParts: TypeAlias = tuple[Callable[[bytes], Any], Callable[[list[Any]], int], int, type]


def _raw_map_decode() -> tuple[_Decode, PlainParts]:
    """`_decode_map` with plain stores' `token_ids` left as msgpack bytes, for an index with
    `raw_tokens` (only the native one, so its module is imported here, not at import time);
    and its plain case's parts for the C slice loop."""
    from kvroute.index.native_index import (
        TOKENS_BAD,
        TOKENS_PLAIN,
        TOKENS_U32,
        batch_verdict,
        configure_plain,
        listed_tokens,
    )

    configure_plain(_RawMapBlockStored)
    decoder = _raw_map_decoder.decode

    def decode(payload: bytes) -> EventBatch:
        raw = decoder(payload)
        events: list[Any] = raw.events
        # One C pass judges the token ids and `_map_batch`'s "plain" test together.
        verdict = batch_verdict(events)
        if verdict == TOKENS_PLAIN:
            return EventBatch(raw.ts, events, raw.data_parallel_rank)
        if verdict != TOKENS_U32:
            # As the typed decode does, refuse the whole batch when one store's token ids are
            # not `list[int] | None`; nil or ints past uint32 the index reads as Python ints.
            if verdict == TOKENS_BAD:
                raise ValueError("token_ids: expected an array of ints")
            events = [listed_tokens(e) for e in events]
        rank = raw.data_parallel_rank
        return _map_batch(raw.ts, events, rank, _RawMapBlockStored, listed_tokens)

    return decode, (decoder, batch_verdict, TOKENS_PLAIN, EventBatch)


def _map_batch(
    ts: float,
    events: list[Any],
    rank: int | None,
    stored_type: type[_MapBlockStored],
    listed: Callable[[Any], Any] | None,
) -> EventBatch:
    # The common case: nothing to judge, nothing to copy. The checks are normalise_events'
    # "plain text" and "upper-case medium" tests, inlined on the hot path (a call per event
    # cost up to 10%); test_decode_batch_is_the_normalised_vllm_batch_on_fixtures and the wire
    # fuzz test keep the two in step.
    e: Any
    for e in events:
        if type(e) is stored_type:
            keys = e.extra_keys
            medium = e.medium
            if (
                e.lora_id is None
                and not e.lookahead_token_ids
                and e.cache_salt is None  # no release sends one; only the verdict sets it
                and (keys is None or keys.count(None) == len(keys))
                and (medium is None or medium == GPU or medium.isupper())
            ):
                continue
            break
        if type(e) is BlockRemoved:
            medium = e.medium
            if medium is None or medium == GPU or medium.isupper():
                continue
            break
    else:
        return EventBatch(ts, events, rank)
    if listed is not None:  # the verdict reads token ids as ints (rare: LoRA, extra keys)
        events = [listed(e) for e in events]
    normal, unsupported = normalise_events(events, stored_type, BlockRemoved, AllBlocksCleared)
    return EventBatch(ts, normal, rank, 0, unsupported)


def _decode_array(payload: bytes) -> EventBatch:
    raw = _array_decoder.decode(payload)
    events, unsupported = normalise_events(
        raw.events, _ArrayBlockStored, _ArrayBlockRemoved, _ArrayAllBlocksCleared
    )
    return EventBatch(raw.ts, events, raw.data_parallel_rank, 0, unsupported)


class BatchDecoder:
    """Decodes payloads of one source into core events, trying first the shape that source sent
    last time.

    Typed msgspec decoding handles the common shapes (map events >= 0.24, array events <= 0.23);
    anything else takes the tolerant path, which either normalises it or raises `WireError`.
    """

    __slots__ = ("_fast", "_plain")

    def __init__(self, *, raw_tokens: bool = False) -> None:
        """`raw_tokens`: plain map stores keep `token_ids` as msgpack bytes (`msgspec.Raw`), for
        an index whose `raw_tokens` is True (index/native_index.py reads them in C)."""
        self._plain: PlainParts | None = None
        first: _Decode = _decode_map
        if raw_tokens:
            first, self._plain = _raw_map_decode()
        self._fast: tuple[_Decode, _Decode] = (first, _decode_array)

    def plain_parts(self) -> PlainParts | None:
        """The raw map decode's parts while it is the shape tried first (the source sends map
        events), for `_recv.take_run`; None otherwise. A batch taken through them equals
        `decode`'s."""
        return self._plain if self._fast[1] is _decode_array else None

    def decode(self, payload: bytes) -> EventBatch:
        first, second = self._fast
        try:
            return first(payload)
        except _DECODE_ERRORS:
            pass
        try:
            batch = second(payload)
        except _DECODE_ERRORS:
            return normalise_batch(_decode_tolerant(payload))
        self._fast = (second, first)
        return batch


def decode_batch(payload: bytes) -> EventBatch:
    """Decode one payload of any vLLM release (0.9.0 – 0.33.0) into core events; raise
    `WireError` if malformed."""
    try:
        return _decode_map(payload)
    except _DECODE_ERRORS:
        pass
    try:
        return _decode_array(payload)
    except _DECODE_ERRORS:
        return normalise_batch(_decode_tolerant(payload))


def decode_vllm(payload: bytes) -> VllmEventBatch:
    """Decode one payload into vLLM's own events, every field as sent (for `kvroute events
    decode`, the simulator's tests and the encoder's round trips); raise `WireError`."""
    try:
        raw = _vllm_map_decoder.decode(payload)
        return VllmEventBatch(raw.ts, raw.events, raw.data_parallel_rank)
    except _DECODE_ERRORS:
        pass
    try:
        array = _array_decoder.decode(payload)
    except _DECODE_ERRORS:
        return _decode_tolerant(payload)
    return VllmEventBatch(
        array.ts, [_vllm_from_array(e) for e in array.events], array.data_parallel_rank
    )


_VLLM_CLEARED: Final = VllmAllBlocksCleared()


def _vllm_from_array(raw: _ArrayEvent) -> VllmEvent:
    if type(raw) is _ArrayBlockStored:
        return VllmBlockStored(
            raw.block_hashes,
            raw.parent_block_hash,
            raw.token_ids,
            raw.block_size,
            raw.lora_id,
            raw.medium,
            raw.lora_name,
            raw.extra_keys,
            raw.group_idx,
            raw.kv_cache_spec_kind,
            raw.kv_cache_spec_sliding_window,
        )
    if type(raw) is _ArrayBlockRemoved:
        return VllmBlockRemoved(raw.block_hashes, raw.medium, raw.group_idx)
    return _VLLM_CLEARED


def parse_live_frames(frames: list[bytes]) -> tuple[bytes, int, bytes]:
    """One live PUB message `[topic, seq8, payload]` (every release) → (topic, seq, payload).

    Pinned by test_live_frames_fixture; anything else raises `WireError`.
    """
    if len(frames) != 3:
        raise WireError(f"live message: expected 3 frames [topic, seq, payload], got {len(frames)}")
    topic, seq, payload = frames
    if len(seq) != 8:
        raise WireError(f"live message seq: expected 8 bytes, got {len(seq)}")
    return topic, int.from_bytes(seq, "big"), payload


# --- the tolerant path ------------------------------------------------------------------------

_MSGSPEC_ERROR = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def _type_name(value: object) -> str:
    return {
        dict: "map",
        list: "array",
        tuple: "array",
        str: "str",
        bytes: "bin",
        int: "int",
        float: "float",
        bool: "bool",
        type(None): "nil",
    }.get(type(value), type(value).__name__)


def _validation_message(where: str, exc: msgspec.ValidationError) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.block_size`"; we say
    # "BlockStored.block_size: expected int, got str".
    match = _MSGSPEC_ERROR.match(str(exc))
    what = str(exc) if match is None else match["what"]
    path = "" if match is None or not match["path"] else match["path"]
    what = what.replace("`", "")
    if what[:1].isupper():
        what = what[0].lower() + what[1:]
    return f"{where}{path}: {what}"


def _decode_tolerant(payload: bytes) -> VllmEventBatch:
    try:
        obj = _untyped_decoder.decode(payload)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        raise WireError(
            f"payload: expected a msgpack KVEventBatch, got undecodable bytes ({exc})"
        ) from exc

    if isinstance(obj, dict):  # not sent by any release; accepted defensively
        ts, raw_events, rank = obj.get("ts"), obj.get("events"), obj.get("data_parallel_rank")
    elif isinstance(obj, list):
        if len(obj) < 2:
            raise WireError(f"EventBatch: expected an array of 2 or 3 items, got {len(obj)}")
        ts, raw_events = obj[0], obj[1]
        rank = obj[2] if len(obj) > 2 else None
    else:
        raise WireError(f"EventBatch: expected array, got {_type_name(obj)}")

    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise WireError(f"EventBatch.ts: expected float, got {_type_name(ts)}")
    if not isinstance(raw_events, list):
        raise WireError(f"EventBatch.events: expected array, got {_type_name(raw_events)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise WireError(
            f"EventBatch.data_parallel_rank: expected int or nil, got {_type_name(rank)}"
        )

    events: list[VllmEvent] = []
    skipped = 0
    for i, raw in enumerate(raw_events):
        event = _normalise_event(i, raw)
        if event is None:
            skipped += 1
        else:
            events.append(event)
    return VllmEventBatch(float(ts), events, rank, skipped)


def _normalise_event(i: int, raw: object) -> VllmEvent | None:
    """Turn one untyped event into its Struct; None for a kind we do not know."""
    if isinstance(raw, dict):
        kind = raw.get("type")
        fields = {k: v for k, v in raw.items() if k != "type"}
    elif isinstance(raw, list) and raw:
        kind = raw[0]
        positions = _POSITIONS.get(kind, ()) if isinstance(kind, str) else ()
        fields = dict(zip(positions, raw[1:], strict=False))
    else:
        raise WireError(f"events[{i}]: expected array or map event, got {_type_name(raw)}")
    if not isinstance(kind, str):
        raise WireError(f"events[{i}].type: expected str, got {_type_name(kind)}")
    cls = _VLLM_TYPES.get(kind)
    if cls is None:
        return None
    # Keep only the fields the Struct knows: unknown keys of newer releases are ignored.
    known = {k: v for k, v in fields.items() if k in cls.__struct_fields__}
    try:
        return msgspec.convert(known, cls)
    except msgspec.ValidationError as exc:
        raise WireError(_validation_message(f"events[{i}] {kind}", exc)) from exc
