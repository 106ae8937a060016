"""The gateway's snapshot contents: per source its identity, recovery state (last seq and the
digest of that batch) and exported blocks, in snapshot-file sections; and reading them back."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeAlias

import msgspec

from kvroute.core import SourceId, SourceSpec
from kvroute.index.export import SourceExport
from kvroute.persist.errors import RefuseReason, SnapshotRefused
from kvroute.persist.snapshot_file import Payload, read_snapshot

__all__ = [
    "CONTENTS",
    "RestoredSource",
    "SnapshotSource",
    "fleet_identity",
    "load_sources",
    "snapshot_sections",
]

# What the file's fleet fingerprint covers besides the fleet name: the meaning of the local
# hashes (index/hashing.py: xxh3-64 over big-endian u32 token ids, chained from a seed of the
# model and LoRA) and of these sections. A snapshot of another contract is foreign, refused.
CONTENTS = "kvroute-index/1 xxh3-64 be-u32 chained"
_META = "sources"


class _SourceMeta(msgspec.Struct, frozen=True):
    source: str
    engine: str
    model: str
    rank: int
    endpoint: str
    replay_endpoint: str
    topic: str
    last: int
    digest: bytes
    partitions: list[tuple[str | None, int]]
    last_size: int
    last_lora: str | None


class _Meta(msgspec.Struct, frozen=True):
    sources: list[_SourceMeta]


# One source as the subscribers hand it over (events/subscriber.py `snapshot_sources`): its
# spec, last applied seq, that batch's digest and its exported blocks.
SnapshotSource: TypeAlias = tuple[SourceSpec, int, bytes, SourceExport]


@dataclass(frozen=True, slots=True)
class RestoredSource:
    """One source read back: restore it only into a source of the same identity (`matches`)."""

    source: SourceId
    engine: str
    model: str
    rank: int
    endpoint: str
    replay_endpoint: str
    topic: str
    last: int
    digest: bytes
    export: SourceExport

    def matches(self, spec: SourceSpec) -> bool:
        """Same source id, engine, model, rank, endpoints and topic: the same place to ask."""
        return (
            spec.source == self.source
            and spec.engine == self.engine
            and spec.model == self.model
            and spec.rank == self.rank
            and spec.endpoint == self.endpoint
            and (spec.replay_endpoint or "") == self.replay_endpoint
            and spec.topic == self.topic
        )


def fleet_identity(fleet: str) -> str:
    """The fingerprinted identity of a snapshot: the fleet's name and the contents contract."""
    return f"{fleet}\0{CONTENTS}"


def snapshot_sections(sources: list[SnapshotSource]) -> Iterator[tuple[str, Payload]]:
    """The sections of a snapshot of `sources`: one metadata section, then each source's block
    pairs (streamed by the file writer, never joined into one buffer)."""
    meta = _Meta(
        [
            _SourceMeta(
                spec.source,
                spec.engine,
                spec.model,
                spec.rank,
                spec.endpoint,
                spec.replay_endpoint or "",
                spec.topic,
                last,
                digest,
                export.partitions,
                export.last_size,
                export.last_lora,
            )
            for spec, last, digest, export in sources
        ]
    )
    yield _META, msgspec.msgpack.encode(meta)
    for i, (_spec, _last, _digest, export) in enumerate(sources):
        yield f"blocks/{i}", export.pairs


def load_sources(path: str | os.PathLike[str], *, fleet: str) -> list[RestoredSource]:
    """The sources of the snapshot at `path`; `SnapshotRefused` (with its reason) when the file
    is missing, damaged, of another version or of another fleet or contents contract."""
    with read_snapshot(path, fleet=fleet_identity(fleet)) as snap:
        try:
            meta = msgspec.msgpack.decode(snap[_META], type=_Meta)
        except (KeyError, msgspec.DecodeError) as exc:
            raise SnapshotRefused(
                RefuseReason.CORRUPT,
                f"snapshot {path} refused (corrupt): its sources section is unreadable ({exc}); "
                "starting cold",
                str(path),
            ) from exc
        out: list[RestoredSource] = []
        for i, m in enumerate(meta.sources):
            name = f"blocks/{i}"
            if name not in snap or len(snap[name]) % 16:
                raise SnapshotRefused(
                    RefuseReason.CORRUPT,
                    f"snapshot {path} refused (corrupt): section {name} is missing or not "
                    "whole pairs; starting cold",
                    str(path),
                )
            export = SourceExport(m.partitions, m.last_size, m.last_lora, bytes(snap[name]))
            out.append(
                RestoredSource(
                    SourceId(m.source),
                    m.engine,
                    m.model,
                    m.rank,
                    m.endpoint,
                    m.replay_endpoint,
                    m.topic,
                    m.last,
                    m.digest,
                    export,
                )
            )
        return out
