"""The gateway's snapshot contents (persist/index_snapshot.py) and its writer (persist/writer.py):
sources round trip with their recovery state, a foreign fleet or contents contract is refused, and
the forked writer captures one instant without stalling the event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from kvroute.core import EventCounters, SourceSpec
from kvroute.index import PrefixIndex
from kvroute.index.export import SourceExport
from kvroute.persist import RefuseReason, SnapshotRefused, write_snapshot
from kvroute.persist.index_snapshot import (
    SnapshotSource,
    fleet_identity,
    load_sources,
    snapshot_sections,
)
from kvroute.persist.writer import SnapshotWriter
from tests.index_impl import new_index
from tests.unit.index.test_native_differential import MODEL, Stream


def _index_with_blocks(seed: int = 1) -> tuple[PrefixIndex, Stream]:
    stream = Stream(seed, 2, 1e-9)
    index = new_index(counters=EventCounters())
    for s in stream.sources:
        index.add_source(s, engine=s.rpartition("/")[0], model=MODEL)
    for _ in range(200):
        source = stream.rng.choice(stream.sources)
        index.apply(source, stream.batch(source))
    return index, stream


def _sources(index: PrefixIndex, stream: Stream) -> list[SnapshotSource]:
    out: list[SnapshotSource] = []
    for i, s in enumerate(stream.sources):
        engine = s.rpartition("/")[0]
        spec = SourceSpec(engine, MODEL, f"tcp://h:{5557 + i}", f"tcp://h:{6557 + i}", "kv")
        export = index.export_source(s)
        assert export is not None and export.blocks > 0
        out.append((spec, 100 + i, bytes([i]) * 16, export))
    return out


def test_sources_round_trip_with_their_recovery_state(tmp_path: Path) -> None:
    index, stream = _index_with_blocks()
    sources = _sources(index, stream)
    path = tmp_path / "snap"
    writer = SnapshotWriter(path, fleet="prod", collect=lambda: sources, interval_s=0)
    assert writer.write_now() and writer.stats.written == 1 and writer.stats.last_bytes > 0
    restored = load_sources(path, fleet="prod")
    assert len(restored) == len(sources)
    for r, (spec, last, digest, export) in zip(restored, sources, strict=True):
        assert r.matches(spec) and (r.last, r.digest) == (last, digest)
        assert r.export == export
        moved = SourceSpec(spec.engine, spec.model, "tcp://elsewhere:1", spec.replay_endpoint)
        assert not r.matches(moved)  # another place to ask is another source


def test_a_snapshot_of_another_fleet_is_refused(tmp_path: Path) -> None:
    index, stream = _index_with_blocks()
    path = tmp_path / "snap"
    SnapshotWriter(path, fleet="prod", collect=lambda: _sources(index, stream), interval_s=0)
    assert SnapshotWriter(
        path, fleet="prod", collect=lambda: _sources(index, stream), interval_s=0
    ).write_now()
    with pytest.raises(SnapshotRefused) as refused:
        load_sources(path, fleet="staging")
    assert refused.value.reason is RefuseReason.FLEET
    assert "starting cold" in str(refused.value)


def test_a_snapshot_of_another_contents_contract_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    write_snapshot(path, fleet="prod\0kvroute-index/0 old hash", sections=snapshot_sections([]))
    with pytest.raises(SnapshotRefused) as refused:
        load_sources(path, fleet="prod")
    assert refused.value.reason is RefuseReason.FLEET


_ONE_SOURCE = {
    "source": "e/0",
    "engine": "e",
    "model": MODEL,
    "rank": 0,
    "endpoint": "tcp://h:1",
    "replay_endpoint": "tcp://h:2",
    "topic": "",
    "last": 3,
    "digest": b"",
    "partitions": [],
    "last_size": 16,
    "last_lora": None,
}


@pytest.mark.parametrize(
    "sections",
    [
        {"sources": b"\xc1not msgpack"},
        {"other": b""},
        {"sources": msgspec.msgpack.encode({"sources": [_ONE_SOURCE]})},  # no blocks/0
    ],
    ids=["unreadable", "missing", "blocks_missing"],
)
def test_sources_sections_that_do_not_add_up_are_refused_as_corrupt(
    tmp_path: Path, sections: dict[str, bytes]
) -> None:
    path = tmp_path / "snap"
    write_snapshot(path, fleet=fleet_identity("prod"), sections=sections)
    with pytest.raises(SnapshotRefused) as refused:
        load_sources(path, fleet="prod")
    assert refused.value.reason is RefuseReason.CORRUPT


def test_a_missing_snapshot_is_refused_as_missing(tmp_path: Path) -> None:
    with pytest.raises(SnapshotRefused) as refused:
        load_sources(tmp_path / "none", fleet="prod")
    assert refused.value.reason is RefuseReason.MISSING


def test_the_forked_writer_captures_one_instant_and_the_loop_keeps_running(
    tmp_path: Path,
) -> None:
    index, stream = _index_with_blocks()
    before = _sources(index, stream)
    path = tmp_path / "snap"
    writer = SnapshotWriter(
        path, fleet="prod", collect=lambda: _sources(index, stream), interval_s=0
    )

    async def main() -> tuple[bool, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        written = asyncio.ensure_future(writer.write_in_child())
        while writer.stats.last_pause_s == 0:  # until the fork is done
            await asyncio.sleep(0)
        # The parent changes the index at once: the child writes what it saw at the fork.
        source = stream.sources[0]
        index.reset_source(source)
        ok = await written
        task.cancel()
        return ok, ticks

    ok, ticks = asyncio.run(main())
    assert ok and writer.stats.written == 1 and writer.stats.failed == 0
    assert ticks > 0  # the loop ran while the child wrote
    assert 0 < writer.stats.last_pause_s <= writer.stats.max_pause_s
    restored = load_sources(path, fleet="prod")
    assert [r.export for r in restored] == [export for *_, export in before]


def test_a_failing_child_is_counted_and_keeps_the_previous_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    good = SnapshotWriter(path, fleet="prod", collect=list, interval_s=0)
    assert good.write_now()
    previous = path.read_bytes()

    def broken() -> list[SnapshotSource]:
        raise RuntimeError("collect failed")

    bad = SnapshotWriter(path, fleet="prod", collect=broken, interval_s=0)
    assert asyncio.run(bad.write_in_child()) is False
    assert bad.stats.failed == 1 and bad.stats.written == 0
    assert path.read_bytes() == previous
    missing_dir = SnapshotWriter(tmp_path / "no" / "snap", fleet="p", collect=list, interval_s=0)
    assert missing_dir.write_now() is False and missing_dir.stats.failed == 1


def test_export_of_an_empty_source_round_trips(tmp_path: Path) -> None:
    spec = SourceSpec("e", MODEL, "tcp://h:1", "tcp://h:2")
    empty = SourceExport([], 0, None, b"")
    path = tmp_path / "snap"
    assert SnapshotWriter(
        path, fleet="p", collect=lambda: [(spec, 0, b"", empty)], interval_s=0
    ).write_now()
    (restored,) = load_sources(path, fleet="p")
    assert restored.export == empty and restored.matches(spec)
