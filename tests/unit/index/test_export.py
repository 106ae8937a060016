"""Snapshots of the index (`export_source` / `restore_source`, index/export.py): a restored index
never claims a block the original did not hold, equals it on a plain stream, and restores the
same way across the reference and the native implementation."""

from __future__ import annotations

import pytest

from kvroute.core import EventCounters, SourceId
from kvroute.errors import IndexStateError
from kvroute.index import IndexLimits, PrefixIndex
from kvroute.index.impl import native_error
from tests.unit.index.test_native_differential import MODEL, Stream

IMPLS = ["python"] if native_error() else ["python", "native"]


def _index(impl: str, limits: IndexLimits | None = None) -> PrefixIndex:
    if impl == "python":
        return PrefixIndex(limits, counters=EventCounters())
    from kvroute.index.native_index import NativePrefixIndex

    return NativePrefixIndex(limits, counters=EventCounters())


def _fed(impl: str, seed: int, odd: float, steps: int = 300) -> tuple[PrefixIndex, Stream]:
    stream = Stream(seed, 4, odd)
    index = _index(impl)
    for s in stream.sources:
        index.add_source(s, engine=s.rpartition("/")[0], model=MODEL)
    for _ in range(steps):
        source = stream.rng.choice(stream.sources)
        index.apply(source, stream.batch(source))
    return index, stream


def _restored(original: PrefixIndex, stream: Stream, impl: str, **kw: object) -> PrefixIndex:
    index = _index(impl, **kw)  # type: ignore[arg-type]
    for s in stream.sources:
        index.add_source(s, engine=s.rpartition("/")[0], model=MODEL)
        export = original.export_source(s)
        assert export is not None
        index.restore_source(s, export)
    return index


def _gpu(index: PrefixIndex, source: SourceId) -> set[object]:
    return {h for h, medium in index.holdings(source) if medium == "GPU"}


def _matched(index: PrefixIndex, prompt: list[int]) -> dict[str, int]:
    return {e: r.blocks for e, r in index.match(MODEL, None, prompt).items()}


@pytest.mark.parametrize("source_impl", IMPLS)
@pytest.mark.parametrize("target_impl", IMPLS)
@pytest.mark.parametrize("seed", range(8))
def test_a_restored_index_never_claims_more_than_the_original(
    seed: int, source_impl: str, target_impl: str
) -> None:
    original, stream = _fed(source_impl, seed, odd=1.0)  # media, LoRA, bytes hashes, aliases
    restored = _restored(original, stream, target_impl)
    for s in stream.sources:
        assert _gpu(restored, s) <= _gpu(original, s)
        assert restored.source_block_count(s) <= original.source_block_count(s)
    for _ in range(20):
        prompt = stream.prompt()
        got, want = _matched(restored, prompt), _matched(original, prompt)
        assert all(got[e] <= want.get(e, 0) for e in got), (prompt, got, want)


@pytest.mark.parametrize("source_impl", IMPLS)
@pytest.mark.parametrize("target_impl", IMPLS)
@pytest.mark.parametrize("seed", range(4))
def test_a_plain_stream_restores_exactly(seed: int, source_impl: str, target_impl: str) -> None:
    original, stream = _fed(source_impl, seed, odd=1e-9)  # GPU, no LoRA, u64 hashes
    restored = _restored(original, stream, target_impl)
    for s in stream.sources:
        assert _gpu(restored, s) == _gpu(original, s)
    for _ in range(20):
        prompt = stream.prompt()
        assert _matched(restored, prompt) == _matched(original, prompt)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_smaller_budget_keeps_the_most_recently_stored_blocks(impl: str) -> None:
    original, stream = _fed(impl, 3, odd=1e-9)
    source = max(stream.sources, key=original.source_block_count)
    export = original.export_source(source)
    assert export is not None and export.blocks > 10
    index = _index(impl, IndexLimits(max_blocks_per_source=10))
    index.add_source(source, engine="e", model=MODEL)
    assert index.restore_source(source, export) == 10
    keys = list(original._sources[source].blocks)  # store order, the eviction order
    assert list(index._sources[source].blocks) == keys[-10:]


@pytest.mark.parametrize("impl", IMPLS)
def test_restoring_into_an_unknown_or_non_empty_source_is_refused(impl: str) -> None:
    original, stream = _fed(impl, 5, odd=1e-9)
    source = stream.sources[0]
    export = original.export_source(source)
    assert export is not None
    with pytest.raises(IndexStateError, match="known, empty"):
        _index(impl).restore_source(source, export)
    with pytest.raises(IndexStateError, match="known, empty"):
        original.restore_source(source, export)
    assert original.export_source("nobody/0") is None  # type: ignore[arg-type]
