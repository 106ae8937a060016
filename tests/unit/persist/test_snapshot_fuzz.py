"""persist under fuzzing: a valid snapshot with random flips, overwrites, insertions, deletions,
cuts and appends is refused (never a crash), or, unchanged, returns exactly its sections."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvroute.persist import RefuseReason, SnapshotRefused, read_snapshot
from tests.unit.persist.snapshot_bytes import FLEET, sample_sections, write_sample

# What damage can look like; FLEET and VERSION need a valid header checksum, MISSING a file.
DAMAGE = {RefuseReason.CORRUPT, RefuseReason.TRUNCATED}

_position = st.floats(min_value=0, max_value=1, exclude_max=True)
_edit = st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(1, 255)),
    st.tuples(st.just("set"), _position, st.integers(0, 255)),
    st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), _position, st.integers(1, 64)),
    st.tuples(st.just("overwrite"), _position, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("cut"), _position, st.none()),
    st.tuples(st.just("append"), st.just(0.0), st.binary(min_size=1, max_size=16)),
)


def _apply(data: bytearray, edit: tuple[str, float, object]) -> None:
    op, where, arg = edit
    i = int(where * len(data)) if data else 0
    if op == "flip" and data:
        assert isinstance(arg, int)
        data[i] ^= arg
    elif op == "set" and data:
        assert isinstance(arg, int)
        data[i] = arg
    elif op == "insert":
        assert isinstance(arg, bytes)
        data[i:i] = arg
    elif op == "delete":
        assert isinstance(arg, int)
        del data[i : i + arg]
    elif op == "overwrite":
        assert isinstance(arg, bytes)
        data[i : i + len(arg)] = arg
    elif op == "cut":
        del data[i:]
    elif op == "append":
        assert isinstance(arg, bytes)
        data += arg


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    directory = tmp_path_factory.mktemp("snapshot-fuzz")
    return directory, write_sample(directory / "good.snap")


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(_edit, min_size=1, max_size=4))
def test_a_mutated_snapshot_is_refused_or_exactly_the_original(
    workdir: tuple[Path, bytes], edits: list[tuple[str, float, object]]
) -> None:
    directory, original = workdir
    data = bytearray(original)
    for edit in edits:
        _apply(data, edit)
    path = directory / "mutated.snap"
    path.write_bytes(data)
    try:
        snapshot = read_snapshot(path, fleet=FLEET)
    except SnapshotRefused as refused:
        assert refused.reason in DAMAGE, str(refused)
        assert "\n" not in str(refused)
        return
    with snapshot:
        assert {name: bytes(view) for name, view in snapshot.sections.items()} == (
            sample_sections()
        )
    # Every byte is under a checksum or compared with a constant: only no change gets through.
    assert data == original
