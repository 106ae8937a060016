"""Helpers for the snapshot tests: sample sections, a valid file's bytes, and re-sealing a file
whose fields a test rewrote so that only the rewritten field is wrong."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from kvroute.persist import write_snapshot
from kvroute.persist.layout import HEADER, TRAILER

FLEET = "fleet-a: engine-0,engine-1"

_CRC = struct.Struct("<I")


def streamed() -> Iterator[bytes]:
    """A section in many chunks of uneven sizes, empty ones included."""
    for i in range(7):
        yield bytes([i]) * (i * 13)
        yield b""


def sample_sections() -> dict[str, bytes]:
    """What `write_sample` writes, as whole bytes."""
    return {
        "index": b"\x01\x02\x03" * 11,
        "empty": b"",
        "streamed": b"".join(streamed()),
        "recovery/ünïcode": b"seq=42",
    }


def write_sample(path: Path, fleet: str = FLEET) -> bytes:
    """Write the sample snapshot at `path`; return its bytes."""
    sections = sample_sections()
    write_snapshot(
        path,
        fleet=fleet,
        sections=[
            ("index", bytearray(sections["index"])),
            ("empty", b""),
            ("streamed", streamed()),
            ("recovery/ünïcode", memoryview(sections["recovery/ünïcode"])),
        ],
    )
    return path.read_bytes()


def reseal(data: bytearray) -> bytearray:
    """Recompute the header's and the trailer's checksums (in place) after a test's edit."""
    header_len = HEADER.size
    data[header_len - 4 : header_len] = _CRC.pack(zlib.crc32(data[: header_len - 4]))
    at = len(data) - TRAILER.size
    table_offset, table_len, *_ = TRAILER.unpack_from(data, at)
    crc = zlib.crc32(data[:header_len])
    crc = zlib.crc32(data[table_offset : table_offset + table_len], crc)
    crc = zlib.crc32(data[at : at + 20], crc)
    data[at + 20 : at + 24] = _CRC.pack(crc)
    return data


def set_header(data: bytearray, **fields: int | bytes) -> bytearray:
    """Rewrite header fields by name (see layout.HEADER) and reseal."""
    names = [
        "magic",
        "version",
        "header_len",
        "flags",
        "n_sections",
        "created_ns",
        "file_len",
        "fleet",
        "reserved",
        "crc",
    ]
    values = dict(zip(names, HEADER.unpack_from(data), strict=True))
    values.update(fields)
    data[: HEADER.size] = HEADER.pack(*(values[n] for n in names))
    return reseal(data)
