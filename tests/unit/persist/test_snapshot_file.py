"""persist/snapshot_file.py: sections round-trip (streamed, empty, typed buffers), the write is
atomic (temp file, fsync, rename, fsync of the directory), and a failed write keeps the old file."""

from __future__ import annotations

import array
import errno
import os
import stat
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvroute.errors import KvrouteError
from kvroute.persist import (
    Snapshot,
    SnapshotError,
    read_snapshot,
    remove_stale_temp_files,
    write_snapshot,
)
from kvroute.persist.layout import ALIGN, HEADER, fleet_fingerprint, parse
from tests.unit.persist.snapshot_bytes import FLEET, sample_sections, write_sample


def _contents(snapshot: Snapshot) -> dict[str, bytes]:
    return {name: bytes(view) for name, view in snapshot.sections.items()}


def test_sections_round_trip_in_order(tmp_path: Path) -> None:
    path = tmp_path / "kvroute.snap"
    before = time.time_ns()
    data = write_sample(path)
    with read_snapshot(path, fleet=FLEET) as snapshot:
        assert _contents(snapshot) == sample_sections()
        assert list(snapshot.sections) == list(sample_sections())
        assert snapshot.sections["empty"].nbytes == 0
        assert snapshot.file_bytes == len(data)
        assert snapshot.format_version == 1
        assert snapshot.fleet_fingerprint == fleet_fingerprint(FLEET)
        assert before <= snapshot.created_ns <= time.time_ns()
        assert "index" in snapshot and "absent" not in snapshot
        assert snapshot["index"].readonly
    assert os.listdir(tmp_path) == ["kvroute.snap"]


def test_write_reports_size_time_and_count(tmp_path: Path) -> None:
    path = tmp_path / "s"
    info = write_snapshot(path, fleet=FLEET, sections={"a": b"x" * 100, "b": b""})
    assert info.bytes_written == path.stat().st_size
    assert info.sections == 2
    assert info.seconds >= 0
    assert info.path == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_no_sections_is_a_valid_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "s"
    write_snapshot(path, fleet=FLEET, sections=[])
    with read_snapshot(path, fleet=FLEET) as snapshot:
        assert dict(snapshot.sections) == {}


def test_fleet_may_be_bytes_or_str(tmp_path: Path) -> None:
    path = tmp_path / "s"
    write_snapshot(path, fleet=FLEET.encode(), sections={"a": b"1"})
    with read_snapshot(path, fleet=FLEET) as snapshot:
        assert bytes(snapshot["a"]) == b"1"


def test_typed_and_multidimensional_buffers_are_written_as_their_bytes(tmp_path: Path) -> None:
    path = tmp_path / "s"
    words = array.array("Q", range(1000))
    grid = memoryview(bytes(range(24))).cast("B", shape=[4, 6])
    write_snapshot(path, fleet=FLEET, sections={"q": memoryview(words), "w": [words, grid]})
    with read_snapshot(path, fleet=FLEET) as snapshot:
        assert bytes(snapshot["q"]) == words.tobytes()
        assert bytes(snapshot["w"]) == words.tobytes() + bytes(range(24))
        assert snapshot["w"][: words.itemsize * 1000].cast("Q").tolist() == list(range(1000))


def test_every_section_starts_aligned(tmp_path: Path) -> None:
    path = tmp_path / "s"
    write_snapshot(path, fleet=FLEET, sections={f"s{n}": b"x" * n for n in range(20)})
    _, entries = parse(path.read_bytes(), fleet_fingerprint(FLEET))
    assert [e.offset % ALIGN for e in entries] == [0] * 20
    assert entries[0].offset == HEADER.size


def test_a_new_snapshot_replaces_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "s"
    write_snapshot(path, fleet=FLEET, sections={"a": b"old"})
    write_snapshot(path, fleet=FLEET, sections={"b": b"new"})
    with read_snapshot(path, fleet=FLEET) as snapshot:
        assert _contents(snapshot) == {"b": b"new"}
    assert os.listdir(tmp_path) == ["s"]


def test_a_large_streamed_section_is_neither_built_nor_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "s"
    chunk = bytes(range(256)) * 512  # 128 KiB, reused for every chunk
    n = 256  # 32 MiB in all

    def chunks() -> Iterator[bytes]:
        for _ in range(n):
            yield chunk

    tracemalloc.start()
    try:
        info = write_snapshot(path, fleet=FLEET, sections={"big": chunks(), "tail": b"t"})
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with read_snapshot(path, fleet=FLEET) as snapshot:
            _, read_peak = tracemalloc.get_traced_memory()
            assert snapshot["big"].nbytes == n * len(chunk)
            assert snapshot["big"][-len(chunk) :] == chunk
            assert bytes(snapshot["tail"]) == b"t"
    finally:
        tracemalloc.stop()
    assert info.bytes_written > n * len(chunk)
    assert write_peak < 4 << 20, write_peak  # the 1 MiB write buffer, not 32 MiB
    assert read_peak < 1 << 20, read_peak  # mapped, never copied


def test_close_releases_the_views_but_a_kept_slice_stays_readable(tmp_path: Path) -> None:
    path = tmp_path / "s"
    write_snapshot(path, fleet=FLEET, sections={"a": b"abcdef"})
    snapshot = read_snapshot(path, fleet=FLEET)
    kept = snapshot["a"][2:]
    view = snapshot["a"]
    snapshot.close()
    assert dict(snapshot.sections) == {}
    with pytest.raises(ValueError, match="released"):
        bytes(view)
    assert bytes(kept) == b"cdef"
    kept.release()
    snapshot.close()  # twice is harmless


def test_the_write_goes_through_a_temp_file_fsync_rename_and_directory_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s"
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        calls.append(("fsync", kind))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(("replace", f"{Path(src).name} -> {Path(dst).name}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_snapshot(path, fleet=FLEET, sections={"a": b"1"})
    assert calls == [
        ("fsync", "file"),
        ("replace", f"s.tmp-{os.getpid()} -> s"),
        ("fsync", "dir"),
    ]


def _failing_payload() -> Iterator[bytes]:
    yield b"partial data " * 1000
    raise RuntimeError("index changed during serialisation")


def _assert_old_snapshot_intact(tmp_path: Path, path: Path, old: bytes) -> None:
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == [path.name], "the temp file was left behind"
    with read_snapshot(path, fleet=FLEET) as snapshot:
        assert _contents(snapshot) == sample_sections()


def test_a_failing_payload_keeps_the_previous_snapshot_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "s"
    old = write_sample(path)
    with pytest.raises(SnapshotError, match="producing section 'index' failed") as raised:
        write_snapshot(path, fleet=FLEET, sections=[("a", b"x"), ("index", _failing_payload())])
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert isinstance(raised.value, KvrouteError)
    assert str(path) in str(raised.value)
    _assert_old_snapshot_intact(tmp_path, path, old)


def test_failing_sections_iterable_keeps_the_previous_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "s"
    old = write_sample(path)

    def sections() -> Iterator[tuple[str, bytes]]:
        yield "a", b"x"
        raise OSError(errno.EIO, "source went away")

    with pytest.raises(SnapshotError, match="producing the sections failed"):
        write_snapshot(path, fleet=FLEET, sections=sections())
    _assert_old_snapshot_intact(tmp_path, path, old)


def test_an_interrupt_midway_removes_the_temp_file_and_propagates(tmp_path: Path) -> None:
    class Stop(BaseException):
        pass

    path = tmp_path / "s"
    old = write_sample(path)

    def payload() -> Iterator[bytes]:
        yield b"x"
        raise Stop

    with pytest.raises(Stop):
        write_snapshot(path, fleet=FLEET, sections={"a": payload()})
    _assert_old_snapshot_intact(tmp_path, path, old)


@pytest.mark.parametrize(
    ("sections", "error", "match"),
    [
        ({"a": 5}, TypeError, "payload must be bytes-like"),
        ({"a": ["text"]}, TypeError, "chunks must be bytes-like"),
        ([("a", b"1"), ("a", b"2")], ValueError, "given twice"),
        ({"": b"1"}, ValueError, "1 to 255 bytes"),
        ({"n" * 256: b"1"}, ValueError, "1 to 255 bytes"),
        ([("a", b"1", b"extra")], TypeError, "pairs"),
        ({"a": [memoryview(bytes(12)).cast("B", shape=[3, 4])[::2]]}, ValueError, "contiguous"),
    ],
)
def test_bad_arguments_raise_and_keep_the_previous_snapshot(
    tmp_path: Path, sections: object, error: type[Exception], match: str
) -> None:
    path = tmp_path / "s"
    old = write_sample(path)
    with pytest.raises(error, match=match):
        write_snapshot(path, fleet=FLEET, sections=sections)  # type: ignore[arg-type]
    _assert_old_snapshot_intact(tmp_path, path, old)


def test_a_failing_fsync_keeps_the_previous_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s"
    old = write_sample(path)

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(SnapshotError, match="Input/output error; the previous snapshot is kept"):
        write_snapshot(path, fleet=FLEET, sections={"a": b"1"})
    monkeypatch.undo()
    _assert_old_snapshot_intact(tmp_path, path, old)


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "s"
    with pytest.raises(SnapshotError) as raised:
        write_snapshot(path, fleet=FLEET, sections={"a": b"1"})
    assert str(raised.value) == (
        f"cannot write snapshot {path}: directory {path.parent} does not exist"
    )


def test_a_file_in_place_of_the_directory_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "s"
    with pytest.raises(SnapshotError, match=f"{tmp_path / 'file'} is not a directory"):
        write_snapshot(path, fleet=FLEET, sections={"a": b"1"})


def test_a_directory_in_place_of_the_snapshot_fails_the_rename(tmp_path: Path) -> None:
    path = tmp_path / "s"
    (path / "inside").mkdir(parents=True)
    with pytest.raises(SnapshotError, match=r"renaming .*s\.tmp-.* to .*s: "):
        write_snapshot(path, fleet=FLEET, sections={"a": b"1"})
    assert sorted(os.listdir(tmp_path)) == ["s"]


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_an_unwritable_directory_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    # Root may write anywhere and a read-only mount needs privileges: fake the kernel's answer.
    path = tmp_path / "s"
    real_open = os.open

    def fake_open(file: str | os.PathLike[str], flags: int, *args: int, **kw: int) -> int:
        if Path(file).parent == tmp_path and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, flags, *args, **kw)

    monkeypatch.setattr(os, "open", fake_open)
    with pytest.raises(SnapshotError) as raised:
        write_snapshot(path, fleet=FLEET, sections={"a": b"1"})
    assert str(raised.value) == (
        f"cannot write snapshot {path}: {path}.tmp-{os.getpid()}: {os.strerror(code)}"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_a_clear_error(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    write_snapshot(directory / "s", fleet=FLEET, sections={"a": b"old"})
    directory.chmod(0o555)
    try:
        with pytest.raises(SnapshotError, match="Permission denied; the previous snapshot is kept"):
            write_snapshot(directory / "s", fleet=FLEET, sections={"a": b"new"})
    finally:
        directory.chmod(0o755)


@pytest.mark.skipif(threading.active_count() > 1, reason="fork with threads running")
def test_a_forked_child_can_write_the_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "s"
    pid = os.fork()
    if pid == 0:  # the child: write, then leave without running any of pytest's clean-up
        code = 1
        try:
            write_snapshot(path, fleet=FLEET, sections={"a": b"from the child"})
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with read_snapshot(path, fleet=FLEET) as snapshot:
        assert bytes(snapshot["a"]) == b"from the child"
    assert os.listdir(tmp_path) == ["s"]


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "s"
    old = write_sample(path)
    stale = [tmp_path / "s.tmp-123", tmp_path / "s.tmp-99999"]
    others = ["s.tmp-", "s.tmp-12x", "t.tmp-5", "s.old", "s.tmp-7-copy"]
    for f in stale:
        f.write_bytes(b"half a snapshot")
    for name in others:
        (tmp_path / name).write_bytes(b"")
    assert sorted(remove_stale_temp_files(path)) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(["s", *others])
    assert path.read_bytes() == old
    assert remove_stale_temp_files(tmp_path / "missing-dir" / "s") == []
