"""events/wire.py under fuzzing: mutated and random payloads either decode or raise WireError, and
every decoder agrees: `decode_batch` == `BatchDecoder` == `normalise_batch(decode_vllm(...))`."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest

from kvroute.core import EventBatch
from kvroute.errors import WireError
from kvroute.events import normalise_batch
from kvroute.events.wire import BatchDecoder, decode_batch, decode_vllm
from kvroute.index.impl import native_error
from tests.shared_fixtures import scenarios

SEED = 20261123
CASES_PER_KIND = 10_000  # x 4 kinds = 40,000 payloads


def _seeds() -> list[bytes]:
    return [s.payload for s in scenarios()]


def _bit_flips(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _byte_edits(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(out) + 1)
        op = rng.randrange(3)
        if op == 0 and out:  # overwrite with a msgpack-interesting byte
            out[min(i, len(out) - 1)] = rng.choice(
                [0x00, 0x7F, 0x80, 0x90, 0x9F, 0xC0, 0xC1, 0xC4, 0xCB, 0xCF, 0xD3, 0xDC, 0xDE, 0xFF]
            )
        elif op == 1:  # insert
            out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif out:  # delete
            del out[i : i + rng.randint(1, 4)]
    return bytes(out)


def _truncate_or_splice(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    if rng.random() < 0.5:
        return data[: rng.randrange(len(data) + 1)]
    other = rng.choice(others)
    return data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1) :]


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "neg", "big", "float", "str", "bytes", "nil", "bool"]
    if depth < 4:
        kinds += ["list", "list", "map", "event"]
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randrange(0, 300)
    if kind == "neg":
        return -rng.randrange(1, 2**63)
    if kind == "big":
        return rng.randrange(2**63, 2**64)
    if kind == "float":
        return rng.uniform(-1e9, 1e9)
    if kind == "str":
        return rng.choice(["BlockStored", "BlockRemoved", "AllBlocksCleared", "type", "GPU", "x"])
    if kind == "bytes":
        return rng.randbytes(rng.choice([0, 16, 32]))
    if kind == "nil":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    if kind == "map":
        keys = ["type", "block_hashes", "medium", "block_size", "token_ids", "ts", "events", "z"]
        return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))}
    tag = rng.choice(["BlockStored", "BlockRemoved", "AllBlocksCleared", "Other"])
    fields = [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 12))]
    return [tag, *fields]


def _random_payload(rng: random.Random) -> bytes:
    if rng.random() < 0.2:
        return rng.randbytes(rng.randint(0, 64))
    shape = rng.random()
    events = [_random_value(rng, 1) for _ in range(rng.randint(0, 4))]
    if shape < 0.7:
        obj: Any = [rng.choice([1.5, 7, "ts", None]), events, *([rng.choice([0, 1, None, "r"])])]
        obj = obj[: rng.randint(0, 4)] if rng.random() < 0.2 else obj
    elif shape < 0.8:
        obj = {"ts": 1.0, "events": events, "data_parallel_rank": rng.choice([0, None, "x"])}
    else:
        obj = _random_value(rng)
    return msgspec.msgpack.encode(obj)


def _raw_decoder() -> BatchDecoder | None:
    """The decoder that leaves token ids as msgpack bytes, where the native core is built."""
    return None if native_error() else BatchDecoder(raw_tokens=True)


def _listed(batch: EventBatch) -> EventBatch:
    from kvroute.index.native_index import listed_tokens

    return msgspec.structs.replace(batch, events=[listed_tokens(e) for e in batch.events])


def _check(payload: bytes, decoder: BatchDecoder, raw: BatchDecoder | None = None) -> str:
    try:
        batch = decode_batch(payload)
    except WireError:
        outcome = "error"
    else:
        assert isinstance(batch, EventBatch)
        outcome = "ok"
    for each in (decoder, raw):
        if each is None:
            continue
        try:
            again = each.decode(payload)
        except WireError:
            assert outcome == "error", payload.hex()
        else:
            assert outcome == "ok" and _listed(again) == batch, payload.hex()
    try:
        raw = decode_vllm(payload)
    except WireError:
        assert outcome == "error", payload.hex()
    else:
        assert outcome == "ok" and normalise_batch(raw) == batch, payload.hex()
    return outcome


@pytest.mark.parametrize("kind", ["bit_flips", "byte_edits", "truncate_splice", "random"])
def test_fuzzed_payloads_decode_or_raise_wire_error(kind: str) -> None:
    rng = random.Random(f"{SEED}-{kind}")
    seeds = _seeds()
    decoder = BatchDecoder()
    raw = _raw_decoder()
    outcomes = {"ok": 0, "error": 0}
    for _ in range(CASES_PER_KIND):
        data = rng.choice(seeds)
        if kind == "bit_flips":
            payload = _bit_flips(rng, data)
        elif kind == "byte_edits":
            payload = _byte_edits(rng, data)
        elif kind == "truncate_splice":
            payload = _truncate_or_splice(rng, data, seeds)
        else:
            payload = _random_payload(rng)
        outcomes[_check(payload, decoder, raw)] += 1
    # Both outcomes occur: the fuzzer reaches the decoder's success and error paths.
    assert outcomes["ok"] > 0 and outcomes["error"] > 0, outcomes


def test_deeply_nested_payload_is_a_wire_error_not_a_crash() -> None:
    payload = b"\x92\xcb" + bytes(8) + b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(WireError):
        decode_batch(payload)
    raw = _raw_decoder()
    if raw is not None:
        with pytest.raises(WireError):
            raw.decode(payload)


@pytest.mark.parametrize("where", ["token_ids", "extra_keys"])
def test_deeply_nested_field_of_an_event_is_a_wire_error_not_a_crash(where: str) -> None:
    event = (
        b"\x83\xa4type\xabBlockStored\xacblock_hashes\x91\x01"
        + msgspec.msgpack.encode(where)
        + b"\x91" * 100_000
        + b"\xc0"
    )
    payload = b"\x92\xcb" + bytes(8) + b"\x91" + event
    for decoder in (BatchDecoder(), _raw_decoder()):
        if decoder is not None:
            with pytest.raises(WireError):
                decoder.decode(payload)
