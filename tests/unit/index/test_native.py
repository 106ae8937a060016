"""The compiled core's parts on their own: xxh3-64 against the reference library, our chained
hash against index/hashing.py, NativeMap against dict, and choosing the implementation."""

from __future__ import annotations

import collections
import platform
import random
import shutil
import subprocess
from typing import Any

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.errors import ConfigError, IndexStateError
from kvroute.index import PrefixIndex, chain_hashes, create_index
from kvroute.index import impl as impl_module
from kvroute.index.impl import native_error, resolve_impl

pytestmark = pytest.mark.skipif(
    native_error() is not None, reason=f"native index core not built: {native_error()}"
)


@pytest.fixture(scope="module")
def native() -> Any:
    from kvroute.index import _native  # type: ignore[attr-defined]

    return _native


# Every length class of the specification (0, 1-3, 4-8, 9-16, 17-128, 129-240, long with one
# and several 1024-byte blocks), with and without a seed.
LENGTHS = [*range(0, 260), 383, 384, 400, 511, 1023, 1024, 1025, 2048, 4096, 5000]


@pytest.mark.parametrize("seed", [0, 1, 0x9E3779B185EBCA87, 2**64 - 1])
def test_xxh3_64_matches_the_reference_library_at_every_length(native: Any, seed: int) -> None:
    rng = random.Random(seed)
    for n in LENGTHS:
        data = rng.randbytes(n)
        assert native.xxh3_64(data, seed) == xxhash.xxh3_64_intdigest(data, seed), n


def test_xxh3_64_known_vectors(native: Any) -> None:
    # From docs/notes/issue-12-research.md §B: data is bytes((i*31+7) & 0xff for i in range(n)).
    vectors = {0: 0x2D06800538D394C2, 16: 0x7E484C18D74895D0, 400: 0x4ED40FEBAC58B282}
    for n, want in vectors.items():
        assert native.xxh3_64(bytes((i * 31 + 7) & 0xFF for i in range(n))) == want


@settings(max_examples=200, deadline=None)
@given(
    parent=st.integers(0, 2**64 - 1),
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=70),
    size=st.integers(1, 17),
)
def test_chain_hashes_matches_the_python_reference(
    native: Any, parent: int, tokens: list[int], size: int
) -> None:
    assert native.chain_hashes(parent, tokens, size) == chain_hashes(parent, tokens, size)  # type: ignore[arg-type]


def test_chain_hashes_refuses_what_the_reference_refuses(native: Any) -> None:
    with pytest.raises(IndexStateError, match="2\\*\\*32"):
        native.chain_hashes(0, [1, 2**32], 1)
    with pytest.raises(IndexStateError, match="2\\*\\*32"):
        native.chain_hashes(0, [1, "x"], 1)
    with pytest.raises(IndexStateError, match="block_size"):
        native.chain_hashes(0, [1], 0)


KEYS = st.one_of(
    st.integers(0, 40),
    st.integers(2**64 - 3, 2**64 + 3),
    st.integers(-3, -1),
    st.binary(max_size=2),
    st.tuples(st.sampled_from(["CPU", "DISK"]), st.integers(0, 5)),
)
VALUES = st.one_of(st.integers(0, 2**64 - 1), st.integers(2**64, 2**70), st.integers(-2, -1))
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), KEYS, VALUES),
        st.tuples(st.just("del"), KEYS, st.none()),
        st.tuples(st.just("pop"), KEYS, st.none()),
        st.tuples(st.just("setdefault"), KEYS, VALUES),
        st.tuples(st.just("clear"), st.none(), st.none()),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(ops=OPS)
def test_native_map_behaves_as_a_dict(native: Any, ops: list[tuple[str, Any, Any]]) -> None:
    m, d = native.NativeMap(), {}
    for op, k, v in ops:
        if op == "set":
            m[k] = v
            d[k] = v
        elif op == "del":
            if k in d:
                del m[k]
                del d[k]
            else:
                with pytest.raises(KeyError):
                    del m[k]
        elif op == "pop":
            assert m.pop(k, "none") == d.pop(k, "none")
        elif op == "setdefault":
            assert m.setdefault(k, v) == d.setdefault(k, v)
        else:
            m.clear()
            d.clear()
        assert len(m) == len(d)
        assert list(m.items()) == list(d.items())  # store order, as dict keeps it
        assert m == d
    for k in d:
        assert k in m and m[k] == d[k] and m.get(k) == d[k]
    assert m.objects() == sum(
        1 for k, v in d.items() if not (type(k) is int and 0 <= k < 2**64 and 0 <= v < 2**64)
    )


def test_native_map_setdefault_returns_the_default_object_on_insert(native: Any) -> None:
    # prefix_index.py's fast path tells a new hash from an old one by identity.
    m = native.NativeMap()
    bit = 1 << 40
    assert m.setdefault(7, bit) is bit
    assert m.setdefault(7, 1 << 41) == bit


def test_native_map_iteration_refuses_a_changed_map(native: Any) -> None:
    m = native.NativeMap()
    m[1] = 1
    m[2] = 2
    it = iter(m)
    next(it)
    m[3] = 3
    with pytest.raises(RuntimeError, match="changed during iteration"):
        next(it)


def _store_and_evict(m: Any, d: dict[int, int], rng: random.Random, count: int, every: int) -> None:
    """`count` random keys into both maps; each `every`-th store also evicts the oldest key."""
    for i in range(count):
        k = rng.getrandbits(64)
        m[k] = d[k] = i
        if i % every == 0:
            victim = next(iter(d))
            del m[victim]
            del d[victim]


def test_native_map_grows_and_shrinks_through_many_keys(native: Any) -> None:
    m, d = native.NativeMap(), {}
    _store_and_evict(m, d, random.Random(5), 60_000, 3)
    assert m == d
    assert list(m) == list(d)
    assert m.nbytes() > 0


def test_implementation_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_impl("python") == "python"
    assert resolve_impl("auto") == "native"
    assert type(create_index(impl="python")) is PrefixIndex
    assert type(create_index(impl="native")).__name__ == "NativePrefixIndex"
    monkeypatch.setattr(impl_module, "native_error", lambda: "no compiler")
    with pytest.raises(ConfigError, match="KVROUTE_INDEX_IMPL=python"):
        resolve_impl("native")
    assert resolve_impl("auto") == "python"  # with one warning in the log


def test_a_cleared_source_leaves_match_at_once_and_the_holder_masks_over_later_batches() -> None:
    from kvroute.core import AllBlocksCleared, BlockStored, EventBatch, SourceId
    from kvroute.index.native_index import NativePrefixIndex

    index = NativePrefixIndex()
    index.drain_min, index.drain_per_batch = 10, 7
    a, b = SourceId("a/0"), SourceId("b/0")
    index.add_source(a, engine="a", model="m")
    index.add_source(b, engine="b", model="m")
    tokens = list(range(4 * 40))
    for source in (a, b):
        index.apply(source, EventBatch(0.0, [BlockStored(list(range(1, 41)), None, tokens, 4)]))
    bit_before = index._sources[a].bit
    index.apply(a, EventBatch(0.0, [AllBlocksCleared()]))
    assert index._draining  # the old bit is still in the holder masks ...
    assert set(index.match("m", None, tokens)) == {"b"}  # ... but no longer counts
    assert index.source_block_count(a) == 0 and index._sources[a].bit != bit_before
    index.apply(a, EventBatch(0.0, [BlockStored([1], None, tokens[:4], 4)]))  # a slice drained
    assert index.match("m", None, tokens)["a"].blocks == 1
    assert index.blocks_by_model() == {"m": 40}  # drains the rest: exact counts
    assert not index._draining and bit_before in index._free_bits


def test_a_reserved_map_takes_that_many_keys_without_growing(native: Any) -> None:
    m = native.NativeMap()
    for k in range(100):
        m[k] = k
    m.reserve(50)  # fewer than it holds: nothing to do
    m.reserve(20_000)
    reserved = m.nbytes()
    assert reserved >= 20_000 * 17
    for k in range(100, 20_000):
        m[k] = k
    assert m.nbytes() == reserved  # no growth on the way ...
    assert list(m.items()) == [(k, k) for k in range(20_000)]
    m[20_000] = 0  # ... and the usual growth past it
    assert m.nbytes() > reserved and len(m) == 20_001


@pytest.mark.parametrize("drain_min", [10, 1 << 30], ids=["fresh map", "cleared map"])
def test_a_cleared_source_refills_a_map_sized_from_before(native: Any, drain_min: int) -> None:
    from kvroute.core import AllBlocksCleared, BlockStored, EventBatch, SourceId
    from kvroute.index.native_index import NativePrefixIndex
    from kvroute.index.prefix_index import PrefixIndex

    tokens = list(range(4 * 3000))
    stored = EventBatch(0.0, [BlockStored(list(range(1, 3001)), None, tokens, 4)])
    cleared = EventBatch(0.0, [AllBlocksCleared()])
    index, reference = NativePrefixIndex(), PrefixIndex()
    index.drain_min = drain_min
    a = SourceId("a/0")
    for ix in (index, reference):
        ix.add_source(a, engine="a", model="m")
        ix.apply(a, stored)
        ix.apply(a, cleared)
    reserved = index._sources[a].blocks.nbytes()
    assert reserved >= 3000 * 17 and index.source_block_count(a) == 0
    for ix in (index, reference):
        ix.apply(a, stored)
    assert index._sources[a].blocks.nbytes() == reserved  # filled again without growing
    assert sorted(index.holdings(a)) == sorted(reference.holdings(a))
    assert index.match("m", None, tokens)["a"].blocks == 3000


def test_maintain_moves_a_growing_table_in_idle_slices(native: Any) -> None:
    from kvroute.core import BlockStored, EventBatch, SourceId
    from kvroute.index.native_index import NativePrefixIndex

    m = native.NativeMap()
    k = 0
    while not m.migrate_some(0):  # until an insert starts a bigger table it cannot fill at once
        m[k] = k
        k += 1
        assert k < 10_000
    assert m.migrate_some(1) is True  # one entry moved, more remain
    assert m.migrate_some(1 << 20) is False
    assert dict(m.items()) == {j: j for j in range(k)}

    index = NativePrefixIndex()
    a = SourceId("a/0")
    index.add_source(a, engine="a", model="m")
    tokens = list(range(4 * 5000))
    index.apply(a, EventBatch(0.0, [BlockStored(list(range(1, 5001)), None, tokens, 4)]))
    slices = 0
    while index.maintain(a):
        slices += 1
        assert slices < 100
    assert not index.maintain(a)  # nothing left: the subscriber goes back to waiting
    assert index.match("m", None, tokens)["a"].blocks == 5000


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), step=st.sampled_from([0, 1, 3, 64]))
def test_native_map_stays_a_dict_while_a_growing_table_migrates(
    native: Any, seed: int, step: int
) -> None:
    # Growth moves entries in store order and leaves the old table's slots as they are until
    # it is freed (_native.c `migrate`): deleting a key before or after its entry moved, or
    # while it waits to be placed, then storing it again, must read as a dict reads. A small
    # key space makes the same keys come back while tables grow and migrate.
    rng = random.Random(seed)
    m, d = native.NativeMap(), {}
    space = rng.choice([40, 400, 3000])
    for i in range(rng.randint(200, 4000)):
        k = rng.randrange(space) * 0x9E3779B97F4A7C15 % 2**64
        if k in d and rng.random() < 0.45:
            del m[k]
            del d[k]
        else:
            m[k] = i
            d[k] = i
        if step and rng.random() < 0.2:
            m.migrate_some(step)
    for j in range(space):  # deleted keys too: a stale old slot must not find them
        k = j * 0x9E3779B97F4A7C15 % 2**64
        assert (k in m) == (k in d) and m.get(k) == d.get(k)
    assert list(m.items()) == list(d.items())
    m.migrate_some(1 << 30)
    assert m == d


def test_a_big_native_map_stays_a_dict_across_tables_made_ahead(native: Any) -> None:
    # From 65,536 slots a table's successor is made at 73 % full and faulted in a page per 4
    # inserts, or 32 pages per `migrate_some` (_native.c `prefault`); the growth at 3/4 takes
    # it, and the table it migrated from is unmapped a piece at a time (`retire_some`). Here it
    # is made and taken, made and dropped by a compaction (a removal-heavy phase), by `reserve`
    # and by `clear`, with idle upkeep now and then: the map reads as a dict, and once upkeep
    # says it is done and the map is cleared, nothing is held.
    m, d = native.NativeMap(), {}
    rng = random.Random(11)
    pending = []
    for chunk in range(240):
        _store_and_evict(m, d, rng, 1000, 5)
        pending.append(m.migrate_some(0))  # a pure look: is a growth or a prefault under way?
        if chunk % 7 == 0:
            m.migrate_some(4096)
    assert any(pending) and not all(pending)
    assert m == d and list(m) == list(d)
    for k in list(d)[: len(d) * 9 // 10]:  # removal-heavy: the next inserts compact the map
        del m[k]
        del d[k]
    for i in range(120_000):
        k = rng.getrandbits(64)
        m[k] = d[k] = i
    assert m == d and list(m) == list(d)
    m.reserve(len(m) + 50_000)
    for i in range(60_000):
        k = rng.getrandbits(64)
        m[k] = d[k] = i
    while m.migrate_some(4096):
        pass
    assert m == d and list(m.items()) == list(d.items())
    m.clear()
    assert len(m) == 0 and m.nbytes() < 1024
    m[5] = 6
    assert dict(m.items()) == {5: 6}


def test_a_shrunken_map_gives_its_memory_back(native: Any) -> None:
    m = native.NativeMap()
    for k in range(200_000):
        m[k] = k
    big = m.nbytes()
    for k in range(199_000):  # evicted down to a fraction ...
        del m[k]
    for k in range(300_000, 500_000):  # ... then new stores fill it: a compaction, smaller
        m[k] = k
        del m[k]
    assert len(m) == 1000 and m.nbytes() < big // 4
    assert list(m.items()) == [(k, k) for k in range(199_000, 200_000)]
    for k in range(199_000, 200_000):
        del m[k]
    assert m.nbytes() < 1024  # empty: nothing kept
    m[1] = 2
    assert dict(m.items()) == {1: 2}


def test_the_budget_never_lets_a_native_map_past_its_entry_limit(native: Any) -> None:
    from kvroute.index import IndexLimits
    from kvroute.index.native_index import NativePrefixIndex

    huge = NativePrefixIndex(IndexLimits(max_index_bytes=1 << 40))
    assert native.MAX_ENTRIES == (1 << 26) - 2
    assert huge.memory()["capacity"] == native.MAX_ENTRIES // 2


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None,
    reason="reads x86-64 machine code with objdump",
)
def test_the_apply_loop_keeps_its_prefetches(native: Any) -> None:
    # GCC 12 at -O2 deleted every __builtin_prefetch of the apply loop (a read prefetch after an
    # early return), unnoticed for months: _native.c's prefetch() is asm volatile instead.
    # apply_run asks for the slots of coming events' blocks and of a store's holders.
    out = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", native.__file__],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    fn, counts = "", collections.Counter[str]()
    for line in out.splitlines():
        if line.endswith(">:"):
            fn = line.rsplit("<", 1)[-1][:-2]
        elif "prefetch" in line:
            counts[fn] += 1
    assert counts["py_apply_run"] >= 2 and counts["migrate"] >= 1, counts
