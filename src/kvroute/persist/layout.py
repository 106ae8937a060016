"""The snapshot file's bytes (format version 1): encode the header, section table and trailer, and
check a mapped file against them without trusting any length it records."""

from __future__ import annotations

import hashlib
import mmap
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from kvroute.persist.errors import RefuseReason

__all__ = [
    "ALIGN",
    "END_MAGIC",
    "ENTRY",
    "FORMAT_VERSION",
    "HEADER",
    "KNOWN_FLAGS",
    "MAGIC",
    "MAX_NAME_BYTES",
    "TRAILER",
    "Header",
    "LayoutRefusal",
    "SectionEntry",
    "encode_header",
    "encode_name",
    "encode_table",
    "encode_trailer",
    "fleet_fingerprint",
    "padding",
    "parse",
]

# Checksums are CRC-32 (zlib.crc32): 2.1-2.5 GB/s against 0.45-0.7 GB/s for blake2b-128, and what
# it must catch is accidental damage (a torn or cut copy, bit rot): it finds every error burst of
# up to 32 bits and misses random damage with odds 2**-32 per checked range. A stronger unkeyed
# hash would not stop deliberate tampering either: whoever can write the file can recompute it.
MAGIC = b"KVRSNAP\0"
END_MAGIC = b"KVRSEND\0"
FORMAT_VERSION = 1
KNOWN_FLAGS = 0  # no flag is defined in version 1; a reader refuses any bit it does not know
ALIGN = 8  # every section starts at a multiple of 8 (zero padding), so it can be cast to u64s
MAX_NAME_BYTES = 255
MAX_HEADER_BYTES = 4096  # any version's header; a bigger one is damage, not a future format

# Every version opens with magic, version and header length, and ends its header with a CRC-32
# of the header's other bytes: a reader can tell an intact foreign version from a damaged file.
PREAMBLE = struct.Struct("<8sII")
# magic, version, header_len, flags, n_sections, created_ns, file_len, fleet, reserved, crc
HEADER = struct.Struct("<8sIIIIQQ16sII")
ENTRY = struct.Struct("<QQIH")  # offset, length, crc, name_len; then name_len bytes of UTF-8
# table_offset, table_len, reserved, crc of header + table + these 20 bytes, END_MAGIC
TRAILER = struct.Struct("<QQII8s")
_TRAILER_CHECKED = 20  # the trailer bytes its own checksum covers
_CRC = struct.Struct("<I")

Buffer = bytes | bytearray | memoryview | mmap.mmap


@dataclass(frozen=True)
class Header:
    """The header's fields (magic, length and checksum aside)."""

    n_sections: int
    created_ns: int  # wall time the writer started, ns since the epoch
    file_len: int  # the whole file, header to end marker
    fleet: bytes  # fleet_fingerprint() of the writer's fleet
    version: int = FORMAT_VERSION
    flags: int = 0


@dataclass(frozen=True)
class SectionEntry:
    """One row of the section table: where a section's payload lies and its CRC-32."""

    name: str
    offset: int
    length: int
    crc: int


class LayoutRefusal(Exception):
    """`parse` found the bytes unusable; `snapshot_file` turns it into `SnapshotRefused`."""

    def __init__(self, reason: RefuseReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def fleet_fingerprint(fleet: str | bytes) -> bytes:
    """16 bytes naming a fleet identity; a snapshot only loads into the fleet it was written for."""
    if not isinstance(fleet, str | bytes | bytearray):
        raise TypeError(f"fleet must be str or bytes, got {type(fleet).__name__}")
    data = fleet.encode() if isinstance(fleet, str) else bytes(fleet)
    return hashlib.blake2b(data, digest_size=16, person=b"kvroute-fleet").digest()


def padding(length: int) -> int:
    """Zero bytes after a payload of `length` bytes up to the next multiple of ALIGN."""
    return -length % ALIGN


def encode_name(name: str) -> bytes:
    """A section name as stored: 1 to 255 bytes of UTF-8 (ValueError otherwise)."""
    if not isinstance(name, str):
        raise TypeError(f"section name must be str, got {type(name).__name__}")
    raw = name.encode()
    if not 1 <= len(raw) <= MAX_NAME_BYTES:
        raise ValueError(f"section name must be 1 to {MAX_NAME_BYTES} bytes, got {len(raw)}")
    return raw


def encode_header(header: Header) -> bytes:
    body = HEADER.pack(
        MAGIC,
        header.version,
        HEADER.size,
        header.flags,
        header.n_sections,
        header.created_ns,
        header.file_len,
        header.fleet,
        0,
        0,
    )[:-4]
    return body + _CRC.pack(zlib.crc32(body))


def encode_table(entries: Sequence[SectionEntry]) -> bytes:
    return b"".join(
        ENTRY.pack(e.offset, e.length, e.crc, len(raw)) + raw
        for e in entries
        for raw in [encode_name(e.name)]
    )


def encode_trailer(table_offset: int, header: bytes, table: bytes) -> bytes:
    fields = TRAILER.pack(table_offset, len(table), 0, 0, END_MAGIC)[:_TRAILER_CHECKED]
    crc = zlib.crc32(fields, zlib.crc32(table, zlib.crc32(header)))
    return TRAILER.pack(table_offset, len(table), 0, crc, END_MAGIC)


def _crc(buf: Buffer, start: int, stop: int, crc: int = 0) -> int:
    """CRC-32 of buf[start:stop] without copying it."""
    with memoryview(buf) as whole, whole[start:stop] as part:
        return zlib.crc32(part, crc)


def _check_header(buf: Buffer, size: int, fingerprint: bytes) -> Header:
    """The header, once magic, length, checksum, version, flags and fleet hold."""
    found = bytes(buf[: min(size, len(MAGIC))])
    if found != MAGIC[: len(found)]:
        raise LayoutRefusal(
            RefuseReason.CORRUPT,
            f"not a kvroute snapshot: expected magic {MAGIC!r}, found {found!r}",
        )
    if size < PREAMBLE.size:
        raise LayoutRefusal(
            RefuseReason.TRUNCATED, f"the file is {size} bytes, it ends inside its header"
        )
    _, version, header_len = PREAMBLE.unpack_from(buf)
    if version == FORMAT_VERSION and header_len != HEADER.size:
        raise LayoutRefusal(
            RefuseReason.CORRUPT,
            f"header length {header_len}, expected {HEADER.size} for format version {version}",
        )
    if not PREAMBLE.size + _CRC.size <= header_len <= MAX_HEADER_BYTES:
        raise LayoutRefusal(
            RefuseReason.CORRUPT,
            f"header length {header_len}, expected {PREAMBLE.size + _CRC.size} to "
            f"{MAX_HEADER_BYTES}",
        )
    if size < header_len:
        raise LayoutRefusal(
            RefuseReason.TRUNCATED,
            f"the file is {size} bytes, it ends inside its {header_len}-byte header",
        )
    (stored,) = _CRC.unpack_from(buf, header_len - _CRC.size)
    computed = _crc(buf, 0, header_len - _CRC.size)
    if stored != computed:
        raise LayoutRefusal(
            RefuseReason.CORRUPT,
            f"header checksum mismatch: stored crc32 {stored:#010x}, computed {computed:#010x}",
        )
    if version != FORMAT_VERSION:
        age = "an older" if version < FORMAT_VERSION else "a newer"
        raise LayoutRefusal(
            RefuseReason.VERSION,
            f"format version {version} ({age} format), this kvroute reads version {FORMAT_VERSION}",
        )
    _, _, _, flags, n_sections, created_ns, file_len, fleet, reserved, _ = HEADER.unpack_from(buf)
    if flags & ~KNOWN_FLAGS:
        raise LayoutRefusal(
            RefuseReason.VERSION,
            f"header flags {flags:#x}, this kvroute knows only {KNOWN_FLAGS:#x}",
        )
    if reserved:
        raise LayoutRefusal(RefuseReason.CORRUPT, f"reserved header field is {reserved:#x}, not 0")
    if fleet != fingerprint:
        raise LayoutRefusal(
            RefuseReason.FLEET,
            f"written for fleet fingerprint {fleet.hex()}, this gateway's fleet is "
            f"{fingerprint.hex()}",
        )
    return Header(n_sections, created_ns, file_len, fleet, version, flags)


def _check_trailer(buf: Buffer, size: int, header: Header) -> tuple[int, int]:
    """(table_offset, table_len) once the file's length, end marker and table checksum hold."""
    if size < header.file_len:
        raise LayoutRefusal(
            RefuseReason.TRUNCATED, f"the file is {size} bytes, its header says {header.file_len}"
        )
    if size > header.file_len:
        raise LayoutRefusal(
            RefuseReason.CORRUPT,
            f"the file is {size} bytes, its header says {header.file_len}: "
            f"{size - header.file_len} unexpected bytes at the end",
        )
    if header.file_len < HEADER.size + TRAILER.size:
        raise LayoutRefusal(
            RefuseReason.CORRUPT,
            f"recorded length {header.file_len} is shorter than a header and a trailer",
        )
    at = header.file_len - TRAILER.size
    table_offset, table_len, reserved, stored, end = TRAILER.unpack_from(buf, at)
    if end != END_MAGIC:
        raise LayoutRefusal(
            RefuseReason.CORRUPT, f"end marker: expected {END_MAGIC!r}, found {end!r}"
        )
    if reserved or table_offset < HEADER.size or table_offset + table_len != at:
        raise LayoutRefusal(
            RefuseReason.CORRUPT,
            f"trailer places the section table at {table_offset}+{table_len} (reserved "
            f"{reserved:#x}), expected it to end at {at} with reserved 0",
        )
    least = header.n_sections * (ENTRY.size + 1)
    most = header.n_sections * (ENTRY.size + MAX_NAME_BYTES)
    if not least <= table_len <= most:
        raise LayoutRefusal(
            RefuseReason.CORRUPT,
            f"section table of {table_len} bytes for {header.n_sections} sections, expected "
            f"{least} to {most}",
        )
    computed = _crc(
        buf, at, at + _TRAILER_CHECKED, _crc(buf, table_offset, at, _crc(buf, 0, HEADER.size))
    )
    if stored != computed:
        raise LayoutRefusal(
            RefuseReason.CORRUPT,
            f"section table checksum mismatch: stored crc32 {stored:#010x}, "
            f"computed {computed:#010x}",
        )
    return table_offset, table_len


def _read_table(
    buf: Buffer, header: Header, table_offset: int, table_len: int
) -> list[SectionEntry]:
    """The section table, once every row lies where the previous one ended, inside the file."""
    entries: list[SectionEntry] = []
    names: set[str] = set()
    pos, table_end, expected = table_offset, table_offset + table_len, HEADER.size
    for i in range(header.n_sections):
        if pos + ENTRY.size > table_end:
            raise LayoutRefusal(RefuseReason.CORRUPT, f"section table ends inside row {i}")
        offset, length, crc, name_len = ENTRY.unpack_from(buf, pos)
        pos += ENTRY.size
        if not 1 <= name_len <= MAX_NAME_BYTES or pos + name_len > table_end:
            raise LayoutRefusal(
                RefuseReason.CORRUPT, f"section table row {i}: bad name length {name_len}"
            )
        try:
            name = bytes(buf[pos : pos + name_len]).decode()
        except UnicodeDecodeError:
            raise LayoutRefusal(
                RefuseReason.CORRUPT, f"section table row {i}: name is not UTF-8"
            ) from None
        pos += name_len
        if name in names:
            raise LayoutRefusal(RefuseReason.CORRUPT, f"section {name!r} appears twice")
        names.add(name)
        pad = padding(length)
        if offset != expected or offset + length + pad > table_offset:
            raise LayoutRefusal(
                RefuseReason.CORRUPT,
                f"section {name!r} at {offset}+{length}, expected it at {expected} and to end "
                f"by the section table at {table_offset}",
            )
        if bytes(buf[offset + length : offset + length + pad]) != bytes(pad):
            raise LayoutRefusal(RefuseReason.CORRUPT, f"padding after section {name!r} is not 0")
        expected = offset + length + pad
        entries.append(SectionEntry(name, offset, length, crc))
    if pos != table_end or expected != table_offset:
        raise LayoutRefusal(
            RefuseReason.CORRUPT,
            f"section table ends at {pos}, expected {table_end}; sections end at {expected}, "
            f"expected {table_offset}",
        )
    return entries


def parse(buf: Buffer, fingerprint: bytes) -> tuple[Header, list[SectionEntry]]:
    """Check `buf` as a whole snapshot file, every section's checksum included; raise
    LayoutRefusal at the first thing that does not hold."""
    size = len(buf)
    header = _check_header(buf, size, fingerprint)
    table_offset, table_len = _check_trailer(buf, size, header)
    entries = _read_table(buf, header, table_offset, table_len)
    for e in entries:
        computed = _crc(buf, e.offset, e.offset + e.length)
        if computed != e.crc:
            raise LayoutRefusal(
                RefuseReason.CORRUPT,
                f"section {e.name!r} checksum mismatch: stored crc32 {e.crc:#010x}, "
                f"computed {computed:#010x}",
            )
    return header, entries
