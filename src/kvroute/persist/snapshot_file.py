"""Writing a snapshot file atomically (temp file, fsync, rename, fsync the directory) and reading
one back verified and memory-mapped; synchronous, thread-free, safe in a forked child."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import BinaryIO

from kvroute.persist.errors import RefuseReason, SnapshotError, SnapshotRefused
from kvroute.persist.layout import (
    HEADER,
    TRAILER,
    Header,
    LayoutRefusal,
    SectionEntry,
    encode_header,
    encode_name,
    encode_table,
    encode_trailer,
    fleet_fingerprint,
    padding,
    parse,
)

__all__ = [
    "Chunk",
    "Payload",
    "Snapshot",
    "SnapshotInfo",
    "read_snapshot",
    "remove_stale_temp_files",
    "write_snapshot",
]

# Any object with the buffer protocol is taken (array.array, mmap, numpy arrays, ...).
Chunk = bytes | bytearray | memoryview
# One bytes-like payload, or an iterable of chunks streamed to the file one at a time.
Payload = Chunk | Iterable[Chunk]

_WRITE_BUFFER = 1 << 20  # chunks this big or bigger go to the file without a copy
_FILE_MODE = 0o600  # the gateway alone reads its snapshots
_TEMP_INFIX = ".tmp-"  # <path>.tmp-<pid>: the writer's file until it is renamed over <path>


@dataclass(frozen=True)
class SnapshotInfo:
    """What `write_snapshot` wrote: the file's size and the time writing it took."""

    path: Path
    bytes_written: int
    seconds: float
    created_ns: int
    sections: int


def _temp_path(target: Path) -> Path:
    return target.with_name(f"{target.name}{_TEMP_INFIX}{os.getpid()}")


def remove_stale_temp_files(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temp files writers of the snapshot at `path` left when they died mid-write
    (each may be as big as a snapshot); return them. Call it at start, before any writer runs."""
    target = Path(path)
    removed: list[Path] = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in target.parent.iterdir():
            suffix = entry.name.removeprefix(target.name + _TEMP_INFIX)
            if suffix != entry.name and suffix.isdigit() and not entry.is_symlink():
                with contextlib.suppress(OSError):  # gone, or not ours to remove: leave it
                    entry.unlink()
                    removed.append(entry)
    return removed


def _pairs(sections: Mapping[str, Payload] | Iterable[tuple[str, Payload]]) -> Iterable[object]:
    return sections.items() if isinstance(sections, Mapping) else sections


def _produced(it: Iterator[object], target: Path, what: str) -> Iterator[object]:
    """Items of a caller's iterator; what it raises becomes a SnapshotError naming `what`."""
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as exc:
            raise SnapshotError(
                f"cannot write snapshot {target}: producing {what} failed: {exc!r}; "
                "the previous snapshot, if any, is kept"
            ) from exc
        yield item


def _chunks(payload: object, name: str, target: Path) -> Iterator[memoryview]:
    """The payload of section `name` as flat byte views, in order."""
    view = _flat(payload, name)
    if view is not None:
        yield view
        return
    if not isinstance(payload, Iterable):
        raise TypeError(
            f"section {name!r}: payload must be bytes-like or an iterable of bytes-like chunks, "
            f"got {type(payload).__name__}"
        )
    for chunk in _produced(iter(payload), target, f"section {name!r}"):
        view = _flat(chunk, name)
        if view is None:
            raise TypeError(
                f"section {name!r}: chunks must be bytes-like, got {type(chunk).__name__}"
            )
        yield view


def _flat(obj: object, name: str) -> memoryview | None:
    """`obj`'s bytes if it has the buffer protocol (bytes, bytearray, array, mmap, ...)."""
    try:
        view = memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        return None
    if not view.c_contiguous:
        raise ValueError(f"section {name!r}: a chunk is not a contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _write_body(
    out: BinaryIO,
    fingerprint: bytes,
    sections: Mapping[str, Payload] | Iterable[tuple[str, Payload]],
    target: Path,
    created_ns: int,
) -> tuple[int, int]:
    """Write the whole file into `out` (the header last, once its lengths are known); return
    (bytes, sections)."""
    out.write(bytes(HEADER.size))
    offset = HEADER.size
    entries: list[SectionEntry] = []
    names: set[str] = set()
    for pair in _produced(iter(_pairs(sections)), target, "the sections"):
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(f"sections must be (name, payload) pairs, got {pair!r:.80}")
        name, payload = pair
        encode_name(name)
        if name in names:
            raise ValueError(f"section {name!r} given twice")
        names.add(name)
        crc = length = 0
        for view in _chunks(payload, name, target):
            out.write(view)
            crc = zlib.crc32(view, crc)
            length += view.nbytes
        out.write(bytes(padding(length)))
        entries.append(SectionEntry(name, offset, length, crc))
        offset += length + padding(length)
    table = encode_table(entries)
    file_len = offset + len(table) + TRAILER.size
    header = encode_header(Header(len(entries), created_ns, file_len, fingerprint))
    out.write(table)
    out.write(encode_trailer(offset, header, table))
    out.seek(0)
    out.write(header)
    return file_len, len(entries)


def _os_error(target: Path, temp: Path, exc: OSError) -> SnapshotError:
    where = exc.filename or temp
    if isinstance(exc, FileNotFoundError) and not target.parent.is_dir():
        what = f"directory {target.parent} does not exist"
    elif isinstance(exc, NotADirectoryError):
        what = f"{target.parent} is not a directory"
    elif exc.filename2:
        what = f"renaming {exc.filename} to {exc.filename2}: {exc.strerror or exc}"
    else:
        what = f"{where}: {exc.strerror or exc}"
    kept = "; the previous snapshot is kept" if target.is_file() else ""
    return SnapshotError(f"cannot write snapshot {target}: {what}{kept}")


def _remove_quietly(path: Path) -> None:
    # Gone already, or the caller's error says more than this one would.
    with contextlib.suppress(OSError):
        os.unlink(path)


def _fsync_directory(target: Path) -> None:
    """Make the rename durable. Some filesystems cannot fsync a directory: nothing to do there."""
    try:
        fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise SnapshotError(
            f"wrote snapshot {target}, but cannot open {target.parent} to make the rename "
            f"durable: {exc.strerror or exc}"
        ) from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise SnapshotError(
                f"wrote snapshot {target}, but fsync of {target.parent} failed: "
                f"{exc.strerror or exc}; it may not survive a power loss"
            ) from exc
    finally:
        os.close(fd)


def write_snapshot(
    path: str | os.PathLike[str],
    *,
    fleet: str | bytes,
    sections: Mapping[str, Payload] | Iterable[tuple[str, Payload]],
) -> SnapshotInfo:
    """Write `sections` (name → bytes-like, or an iterable of chunks streamed one at a time) as
    the snapshot at `path` for `fleet`: into `<path>.tmp-<pid>` beside it, fsync, rename over
    `path`, fsync the directory. Readers see the old file or the new one, never a mix.

    On failure the temp file is removed, the previous snapshot is untouched, and SnapshotError
    says what failed (what a payload iterable raised is its cause). A bad argument (a name that
    is not 1-255 bytes of UTF-8, a name given twice, a chunk that is not bytes-like) raises
    ValueError or TypeError instead. Should only the last step, the directory's fsync, fail,
    the new file is in place and the SnapshotError says so. Uses no thread: call it from a forked
    child freely."""
    started = time.perf_counter()
    created_ns = time.time_ns()
    target = Path(path)
    temp = _temp_path(target)
    fingerprint = fleet_fingerprint(fleet)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(temp, flags, _FILE_MODE)
    except OSError as exc:
        raise _os_error(target, temp, exc) from exc
    try:
        with open(fd, "wb", buffering=_WRITE_BUFFER) as out:
            size, count = _write_body(out, fingerprint, sections, target, created_ns)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException as exc:
        _remove_quietly(temp)
        if isinstance(exc, OSError):
            raise _os_error(target, temp, exc) from exc
        raise
    _fsync_directory(target)
    return SnapshotInfo(target, size, time.perf_counter() - started, created_ns, count)


class Snapshot:
    """A verified snapshot, mapped read-only: `sections` maps each name, in written order, to a
    read-only memoryview of its payload in the file. Close it (or use `with`) once loaded."""

    def __init__(
        self,
        path: Path,
        header: Header,
        entries: list[SectionEntry],
        mapping: mmap.mmap,
        seconds: float,
    ) -> None:
        self.path = path
        self.created_ns = header.created_ns
        self.fleet_fingerprint = header.fleet
        self.format_version = header.version
        self.file_bytes = header.file_len
        self.read_seconds = seconds  # open, map and verify every checksum
        self._mapping = mapping
        with memoryview(mapping) as whole:
            self._views = {e.name: whole[e.offset : e.offset + e.length] for e in entries}
        self.sections: Mapping[str, memoryview] = MappingProxyType(self._views)

    @property
    def created(self) -> float:
        """When the writer started, in seconds since the epoch."""
        return self.created_ns / 1e9

    def __getitem__(self, name: str) -> memoryview:
        return self._views[name]

    def __contains__(self, name: object) -> bool:
        return name in self._views

    def close(self) -> None:
        """Release the section views and unmap the file. A view the caller sliced from a
        section keeps the mapping alive until it is released or collected."""
        for view in self._views.values():
            view.release()
        self._views.clear()
        _unmap(self._mapping)

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _unmap(mapping: mmap.mmap) -> None:
    # BufferError: someone still holds a view of it; the mapping goes with the last one.
    with contextlib.suppress(BufferError):
        mapping.close()


def _refused(reason: RefuseReason, target: Path, detail: str) -> SnapshotRefused:
    if reason is RefuseReason.MISSING:
        message = f"snapshot {target}: {detail}; starting cold"
    else:
        message = f"snapshot {target} refused ({reason}): {detail}; starting cold"
    return SnapshotRefused(reason, message, str(target))


def _map(target: Path) -> mmap.mmap:
    """The file mapped read-only, or SnapshotRefused (MISSING, UNREADABLE, TRUNCATED if empty)."""
    try:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _refused(RefuseReason.MISSING, target, "no such file") from None
    except OSError as exc:
        raise _refused(
            RefuseReason.UNREADABLE, target, f"cannot open it: {exc.strerror or exc}"
        ) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refused(RefuseReason.UNREADABLE, target, "expected a regular file")
        if st.st_size == 0:
            raise _refused(RefuseReason.TRUNCATED, target, "the file is empty")
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise _refused(
            RefuseReason.UNREADABLE, target, f"cannot map it: {exc.strerror or exc}"
        ) from exc
    finally:
        os.close(fd)


def read_snapshot(path: str | os.PathLike[str], *, fleet: str | bytes) -> Snapshot:
    """The snapshot at `path`, every checksum verified, if it was written for `fleet` in this
    format version; otherwise SnapshotRefused, whose `reason` labels the refusal counter and whose
    message is the one log line (MISSING is the quiet first start). The file is mapped, never
    read whole; no length it records is trusted before it is checked against the file's size."""
    started = time.perf_counter()
    target = Path(path)
    mapping = _map(target)
    try:
        header, entries = parse(mapping, fleet_fingerprint(fleet))
    except LayoutRefusal as exc:
        _unmap(mapping)
        raise _refused(exc.reason, target, exc.detail) from None
    except BaseException:
        _unmap(mapping)
        raise
    return Snapshot(target, header, entries, mapping, time.perf_counter() - started)
