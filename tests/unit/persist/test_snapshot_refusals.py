"""persist: every damaged, foreign or missing snapshot is refused with its reason and one clear
line; no cut or flipped byte gets through, and no recorded length is trusted for an allocation."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest

from kvroute.persist import RefuseReason, SnapshotRefused, read_snapshot, write_snapshot
from kvroute.persist.layout import ENTRY, HEADER, MAGIC, TRAILER
from tests.unit.persist.snapshot_bytes import FLEET, reseal, set_header, write_sample


def _refusal(path: Path, fleet: str = FLEET) -> SnapshotRefused:
    with pytest.raises(SnapshotRefused) as raised:
        read_snapshot(path, fleet=fleet).close()
    return raised.value


def _refusal_of(tmp_path: Path, data: bytes | bytearray) -> SnapshotRefused:
    path = tmp_path / "damaged.snap"
    path.write_bytes(data)
    return _refusal(path)


@pytest.fixture
def sample(tmp_path: Path) -> bytes:
    return write_sample(tmp_path / "good.snap")


def _assert_one_clear_line(refused: SnapshotRefused, path: Path) -> None:
    message = str(refused)
    assert message == refused.message
    assert "\n" not in message
    assert message.startswith(f"snapshot {path} ")
    assert message.endswith("; starting cold")
    assert refused.path == str(path)


def test_a_missing_file_is_refused_quietly(tmp_path: Path) -> None:
    path = tmp_path / "never-written.snap"
    refused = _refusal(path)
    assert refused.reason is RefuseReason.MISSING
    assert str(refused) == f"snapshot {path}: no such file; starting cold"


def test_a_directory_is_unreadable(tmp_path: Path) -> None:
    refused = _refusal(tmp_path)
    assert refused.reason is RefuseReason.UNREADABLE
    assert "expected a regular file" in str(refused)
    _assert_one_clear_line(refused, tmp_path)


def test_an_empty_file_is_truncated(tmp_path: Path) -> None:
    refused = _refusal_of(tmp_path, b"")
    assert refused.reason is RefuseReason.TRUNCATED
    assert "the file is empty" in str(refused)


def test_another_file_is_not_a_snapshot(tmp_path: Path) -> None:
    refused = _refusal_of(tmp_path, b'{"index": []}\n' * 10)
    assert refused.reason is RefuseReason.CORRUPT
    assert "not a kvroute snapshot: expected magic b'KVRSNAP\\x00', found b'{\"index\"'" in str(
        refused
    )
    _assert_one_clear_line(refused, tmp_path / "damaged.snap")


def test_a_foreign_fleet_is_refused(tmp_path: Path, sample: bytes) -> None:
    path = tmp_path / "good.snap"
    refused = _refusal(path, fleet="fleet-b")
    assert refused.reason is RefuseReason.FLEET
    assert "written for fleet fingerprint " in str(refused)
    assert ", this gateway's fleet is " in str(refused)
    _assert_one_clear_line(refused, path)


@pytest.mark.parametrize(
    ("version", "age"), [(2, "a newer"), (0, "an older"), (2**32 - 1, "a newer")]
)
def test_an_intact_foreign_version_is_refused_as_version(
    tmp_path: Path, sample: bytes, version: int, age: str
) -> None:
    refused = _refusal_of(tmp_path, set_header(bytearray(sample), version=version))
    assert refused.reason is RefuseReason.VERSION
    assert f"format version {version} ({age} format), this kvroute reads version 1" in str(refused)
    _assert_one_clear_line(refused, tmp_path / "damaged.snap")


def test_a_future_version_with_a_longer_header_is_refused_as_version(tmp_path: Path) -> None:
    preamble = MAGIC + struct.pack("<II", 7, 200)
    body = preamble + bytes(200 - len(preamble) - 4)
    refused = _refusal_of(tmp_path, body + struct.pack("<I", zlib.crc32(body)) + bytes(1000))
    assert refused.reason is RefuseReason.VERSION
    assert "format version 7" in str(refused)


def test_an_unknown_flag_is_refused_as_version(tmp_path: Path, sample: bytes) -> None:
    refused = _refusal_of(tmp_path, set_header(bytearray(sample), flags=4))
    assert refused.reason is RefuseReason.VERSION
    assert "header flags 0x4, this kvroute knows only 0x0" in str(refused)


def test_bytes_after_the_end_are_refused(tmp_path: Path, sample: bytes) -> None:
    refused = _refusal_of(tmp_path, sample + b"\0")
    assert refused.reason is RefuseReason.CORRUPT
    assert f"its header says {len(sample)}: 1 unexpected bytes at the end" in str(refused)


def test_every_cut_is_refused_as_truncated(tmp_path: Path, sample: bytes) -> None:
    for cut in range(len(sample)):
        refused = _refusal_of(tmp_path, sample[:cut])
        assert refused.reason is RefuseReason.TRUNCATED, (cut, str(refused))
        _assert_one_clear_line(refused, tmp_path / "damaged.snap")


def test_cuts_of_a_large_snapshot_are_refused_as_truncated(tmp_path: Path) -> None:
    path = tmp_path / "big.snap"
    write_snapshot(path, fleet=FLEET, sections={"a": bytes(range(256)) * 4000, "b": b"b" * 77})
    data = path.read_bytes()
    cuts = [*range(0, len(data), 4099), *range(len(data) - 200, len(data))]
    for cut in cuts:
        assert _refusal_of(tmp_path, data[:cut]).reason is RefuseReason.TRUNCATED, cut


def _regions(sample: bytes) -> dict[str, range]:
    at = len(sample) - TRAILER.size
    table_offset, _, _, _, _ = TRAILER.unpack_from(sample, at)
    return {
        "header": range(HEADER.size),
        "payloads": range(HEADER.size, table_offset),
        "table": range(table_offset, at),
        "trailer": range(at, len(sample)),
    }


@pytest.mark.parametrize("region", ["header", "payloads", "table", "trailer"])
@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_every_flipped_byte_is_refused_as_corrupt(
    tmp_path: Path, sample: bytes, region: str, mask: int
) -> None:
    for i in _regions(sample)[region]:
        damaged = bytearray(sample)
        damaged[i] ^= mask
        refused = _refusal_of(tmp_path, damaged)
        assert refused.reason is RefuseReason.CORRUPT, (i, str(refused))
        _assert_one_clear_line(refused, tmp_path / "damaged.snap")


def test_a_flipped_payload_byte_names_the_section(tmp_path: Path, sample: bytes) -> None:
    damaged = bytearray(sample)
    damaged[HEADER.size] ^= 1
    refused = _refusal_of(tmp_path, damaged)
    assert "section 'index' checksum mismatch: stored crc32 0x" in str(refused)


def test_a_flipped_header_byte_is_a_header_checksum_mismatch(tmp_path: Path, sample: bytes) -> None:
    damaged = bytearray(sample)
    damaged[30] ^= 1  # created_ns
    assert "header checksum mismatch" in str(_refusal_of(tmp_path, damaged))


def test_a_flipped_trailer_byte_is_caught(tmp_path: Path, sample: bytes) -> None:
    damaged = bytearray(sample)
    damaged[-TRAILER.size + 16] ^= 1  # the trailer's reserved field
    assert "places the section table" in str(_refusal_of(tmp_path, damaged))
    damaged = bytearray(sample)
    damaged[-1] ^= 1
    assert "end marker: expected b'KVRSEND\\x00'" in str(_refusal_of(tmp_path, damaged))


def _entry_offset(sample: bytes, row: int) -> int:
    table_offset, *_ = TRAILER.unpack_from(sample, len(sample) - TRAILER.size)
    pos = table_offset
    for _ in range(row):
        *_, name_len = ENTRY.unpack_from(sample, pos)
        pos += ENTRY.size + name_len
    return pos


def _with_entry(sample: bytes, row: int, **fields: int) -> bytearray:
    data = bytearray(sample)
    pos = _entry_offset(sample, row)
    values = dict(
        zip(["offset", "length", "crc", "name_len"], ENTRY.unpack_from(data, pos), strict=True)
    )
    values.update(fields)
    ENTRY.pack_into(data, pos, *values.values())
    return reseal(data)


def _forged(sample: bytes) -> dict[str, tuple[bytearray, RefuseReason, str]]:
    """Files whose checksums are all right but one recorded length is absurd."""
    n_sections = HEADER.unpack_from(sample)[4]
    huge_table = bytearray(sample)
    TRAILER.pack_into(huge_table, len(sample) - TRAILER.size, 64, 2**63, 0, 0, b"KVRSEND\0")
    return {
        "file_len": (
            set_header(bytearray(sample), file_len=2**64 - 1),
            RefuseReason.TRUNCATED,
            f"its header says {2**64 - 1}",
        ),
        "short file_len": (set_header(bytearray(sample), file_len=70), RefuseReason.CORRUPT, ""),
        "n_sections": (
            set_header(bytearray(sample), n_sections=2**32 - 1),
            RefuseReason.CORRUPT,
            "for 4294967295 sections",
        ),
        "n_sections low": (
            set_header(bytearray(sample), n_sections=n_sections - 1),
            RefuseReason.CORRUPT,
            "",
        ),
        "table_len": (reseal(huge_table), RefuseReason.CORRUPT, "places the section table"),
        "section length": (
            _with_entry(sample, 0, length=2**64 - 1),
            RefuseReason.CORRUPT,
            "section 'index' at 64+18446744073709551615",
        ),
        "section offset": (
            _with_entry(sample, 1, offset=2**63),
            RefuseReason.CORRUPT,
            "expected it at",
        ),
        "name_len": (
            _with_entry(sample, 0, name_len=65535),
            RefuseReason.CORRUPT,
            "bad name length 65535",
        ),
        "header_len": (
            bytearray(MAGIC + struct.pack("<II", 1, 2**32 - 1)) + bytearray(sample[16:]),
            RefuseReason.CORRUPT,
            "header length 4294967295, expected 64",
        ),
        "future header_len": (
            bytearray(MAGIC + struct.pack("<II", 9, 2**31)) + bytearray(sample[16:]),
            RefuseReason.CORRUPT,
            "expected 20 to 4096",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "file_len",
        "short file_len",
        "n_sections",
        "n_sections low",
        "table_len",
        "section length",
        "section offset",
        "name_len",
        "header_len",
        "future header_len",
    ],
)
def test_an_absurd_recorded_length_is_refused_without_allocating(
    tmp_path: Path, sample: bytes, case: str
) -> None:
    data, reason, detail = _forged(sample)[case]
    path = tmp_path / "forged.snap"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        refused = _refusal(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.reason is reason, str(refused)
    assert detail in str(refused)
    assert peak < 64 << 10, peak


@pytest.mark.parametrize("reason", list(RefuseReason))
def test_reasons_are_lowercase_metric_labels(reason: RefuseReason) -> None:
    assert str(reason) == reason.value == reason.name.lower()
