"""The native reader of msgpack token arrays (`_native.token_scan`/`token_list`, the one place
native code reads untrusted bytes) against msgspec's own `list[int] | None` decode, on every
int encoding, hand-made headers, mutations and random bytes. `make test-native-asan` runs this
file under AddressSanitizer."""

from __future__ import annotations

import os
import struct
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvroute.core import BlockStored
from kvroute.index.impl import native_error

pytestmark = pytest.mark.skipif(native_error() is not None, reason=f"{native_error()}")

BAD, U32, NIL, WIDE = -1, 0, 1, 2
EXAMPLES = int(os.environ.get("KVROUTE_TOKEN_FUZZ_EXAMPLES", "400"))
_typed = msgspec.msgpack.Decoder(list[int] | None)


def _native() -> Any:
    from kvroute.index import _native  # type: ignore[attr-defined]

    return _native


def _encodings(v: int) -> list[bytes]:
    """Every msgpack encoding of the int `v`, minimal or not."""
    out: list[bytes] = []
    if 0 <= v <= 0x7F:
        out.append(bytes([v]))
    if -32 <= v < 0:
        out.append(struct.pack(">b", v))
    for tag, fmt, lo, hi in (
        (0xCC, ">B", 0, 2**8 - 1),
        (0xCD, ">H", 0, 2**16 - 1),
        (0xCE, ">I", 0, 2**32 - 1),
        (0xCF, ">Q", 0, 2**64 - 1),
        (0xD0, ">b", -(2**7), 2**7 - 1),
        (0xD1, ">h", -(2**15), 2**15 - 1),
        (0xD2, ">i", -(2**31), 2**31 - 1),
        (0xD3, ">q", -(2**63), 2**63 - 1),
    ):
        if lo <= v <= hi:
            out.append(bytes([tag]) + struct.pack(fmt, v))
    return out


def _header(n: int, kind: int) -> bytes:
    if kind == 0 and n < 16:
        return bytes([0x90 | n])
    if kind <= 1 and n < 2**16:
        return b"\xdc" + struct.pack(">H", n)
    return b"\xdd" + struct.pack(">I", n)


ints = st.one_of(
    st.integers(0, 2**32 - 1),
    st.integers(0, 300),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, 127, 128, 255, 256, 2**16 - 1, 2**16, 2**32 - 1, 2**32, -1, -32, -33]),
)


# Runs of small ids, which the scan takes eight at a time (`fixint8` in _native.c), broken by
# other encodings at every offset.
small_runs = st.lists(
    st.one_of(st.lists(st.integers(0, 127), min_size=1, max_size=20), st.lists(ints, max_size=3)),
    max_size=6,
).map(lambda parts: [v for part in parts for v in part])


@st.composite
def int_arrays(draw: st.DrawFn) -> bytes:
    values = draw(st.one_of(st.lists(ints, max_size=40), small_runs))
    head = _header(len(values), draw(st.integers(0, 2)))
    body = b"".join(draw(st.sampled_from(_encodings(v))) for v in values)
    return head + body


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(int_arrays()))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 3))
        i = draw(st.integers(0, len(data)))
        if op == 0 and data:
            data[min(i, len(data) - 1)] = draw(st.integers(0, 255))
        elif op == 1:
            data[i:i] = draw(st.binary(min_size=1, max_size=6))
        elif op == 2:
            del data[i : i + draw(st.integers(1, 6))]
        else:
            data = data[:i]
    return bytes(data)


def _agrees(raw: bytes) -> None:
    native = _native()
    status, count = native.token_scan(raw)
    try:
        want = _typed.decode(raw)
    except (msgspec.DecodeError, ValueError):
        assert status == BAD, raw.hex()
        with pytest.raises(ValueError):
            native.token_list(raw)
        return
    if want is None:
        assert status == NIL, raw.hex()
    else:
        assert count == len(want), raw.hex()
        in_u32 = all(0 <= t < 2**32 for t in want)
        assert status == (U32 if in_u32 else WIDE), raw.hex()
    assert native.token_list(raw) == want, raw.hex()
    # The packing the apply hashes: big-endian u32 of every id, or nothing for other verdicts.
    packed = struct.pack(f">{len(want)}I", *want) if status == U32 else None
    assert native.token_pack(raw) == packed, raw.hex()


_settings = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_settings
@given(int_arrays())
def test_int_arrays_in_every_encoding_read_as_msgspec_reads_them(raw: bytes) -> None:
    _agrees(raw)


@_settings
@given(mutated())
def test_mutated_arrays_are_refused_or_read_as_msgspec_reads_them(raw: bytes) -> None:
    _agrees(raw)


@_settings
@given(st.binary(max_size=64))
def test_random_bytes_are_refused_or_read_as_msgspec_reads_them(raw: bytes) -> None:
    _agrees(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc0",
        b"\xc0\x00",  # trailing bytes
        b"\x90",
        b"\xdc\x00",  # a cut header
        b"\xdd\x00\x00\x00",
        b"\xdd\xff\xff\xff\xff\x01",  # a count far past the bytes: refused, nothing allocated
        b"\xdc\xff\xff" + b"\x01" * 100,
        b"\x91\xcf\x00\x00",  # a cut uint64
        b"\x91\xca\x00\x00\x00\x00",  # a float32
        b"\x91\xc3",  # true
        b"\x92\x01\x91\x01",  # a nested array
        b"\x91\xa1x",  # a str
        # the verdict's pass reads only the type byte of fixints and uint8/16/32: cut values
        # at the end and in the middle, and a value whose bytes are ints' type bytes
        b"\x91\xcc",
        b"\x91\xcd\x01",
        b"\x91\xce\x01\x02\x03",
        b"\x92\xce\x01\x02\x03\x04",
        b"\x93\xcd\x01\xcd\x01",
        b"\x92\xcd\x01\x02\x05",
        b"\x92\xcd\xcd\xcd\xcd\x01\x02",
        b"\x91\xcc\xff",
        b"\x92\xce\xff\xff\xff\xff\xd0\xff",  # wide after a u32: still scanned to the end
        b"\x92\xd0\xff\xcd\x01",  # wide, then a cut uint16
        # eight-fixint steps: exactly eight, eight with one more array byte than ids, a run cut
        # short of its count, a run ending on a multi-byte id, a trailing byte after a run
        b"\x98" + bytes(range(8)),
        b"\x97" + bytes(range(8)),
        b"\x99" + bytes(range(8)),
        b"\x99" + bytes(range(8)) + b"\xcd\x01\x02",
        b"\x9a" + bytes(range(8)) + b"\xcd\x01",
        b"\x98" + bytes(range(8)) + b"\x00",
        b"\xdc\x00\x11" + bytes(range(17)),
    ],
)
def test_edge_cases_read_as_msgspec_reads_them(raw: bytes) -> None:
    _agrees(raw)


def test_verdict_of_a_batch_is_its_worst_store() -> None:
    native = _native()

    def stored(tokens: Any) -> BlockStored:
        raw = msgspec.Raw(msgspec.msgpack.encode(tokens))
        return msgspec.structs.replace(BlockStored([1], None, [], 1), token_ids=raw)

    plain = [stored([1, 2]), BlockStored([2], None, [3], 1), stored([])]
    assert native.token_verdict(plain) == U32
    assert native.token_verdict([*plain, stored(None)]) == WIDE
    assert native.token_verdict([stored([-1]), *plain]) == WIDE
    assert native.token_verdict([stored(["a"]), stored([2**33])]) == BAD
    # token ids of any other type are the reference model's business, not read here
    assert native.token_verdict([BlockStored([1], None, (1, 2), 1)]) == U32


_MEDIA = [None, "GPU", "CPU", "cpu", "Cpu", "CPU_1", "123", "", "DISK2", "_", "ÜBER", "ＧＰＵ"]


def _raw_events(**fields: Any) -> list[Any]:
    """One raw-mode store with `fields` and one removal with the same medium, decoded by the
    raw map decoder (events/wire.py), so the events are of the types `batch_verdict` reads."""
    from kvroute.events import wire

    store = {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None}
    store |= {"token_ids": [1, 2], "block_size": 2} | fields
    removed = {"type": "BlockRemoved", "block_hashes": [1], "medium": fields.get("medium")}
    payload = msgspec.msgpack.encode([1.0, [store, removed, {"type": "AllBlocksCleared"}], 0])
    return list(wire._raw_map_decoder.decode(payload).events)


@pytest.mark.parametrize(
    "fields",
    [{"medium": m} for m in _MEDIA]
    + [
        {"lora_id": 3},
        {"extra_keys": [None, None]},
        {"extra_keys": [None, "x"]},
        {"extra_keys": []},
        {"lookahead_token_ids": []},
        {"lookahead_token_ids": [[1]]},
        {"cache_salt": "s"},
    ],
    ids=repr,
)
def test_batch_verdict_plain_only_where_the_python_test_passes(fields: dict[str, Any]) -> None:
    from kvroute.events import wire
    from kvroute.index.native_index import TOKENS_PLAIN, TOKENS_U32, batch_verdict

    wire.BatchDecoder(raw_tokens=True)  # configures the native "plain" test
    events = _raw_events(**fields)
    python_plain = wire._map_batch(1.0, events, 0, wire._RawMapBlockStored, None).events is events
    verdict = batch_verdict(events)
    medium = fields.get("medium")
    if isinstance(medium, str) and not medium.isascii():
        # C leaves non-ASCII media to the Python test: never plain, never wrong
        assert verdict == TOKENS_U32
    else:
        assert verdict == (TOKENS_PLAIN if python_plain else TOKENS_U32), (fields, python_plain)


def test_batch_verdict_keeps_token_verdicts_first() -> None:
    from kvroute.events import wire
    from kvroute.index.native_index import TOKENS_BAD, batch_verdict

    wire.BatchDecoder(raw_tokens=True)
    assert batch_verdict(_raw_events(token_ids=None)) == WIDE
    assert batch_verdict(_raw_events(token_ids=[2**40, 1])) == WIDE
    assert batch_verdict(_raw_events(token_ids=["a", 1])) == TOKENS_BAD
    assert batch_verdict(_raw_events(token_ids=["a"], medium="cpu")) == TOKENS_BAD
