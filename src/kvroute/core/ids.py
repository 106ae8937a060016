"""Identifiers every package shares: engine sources (engine, DP rank), our local block hashes,
engine block hashes as sent, and where a source publishes (`SourceSpec`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NewType, TypeAlias

__all__ = ["EngineHash", "LocalHash", "SourceId", "SourceSpec", "source_id"]

LocalHash = NewType("LocalHash", int)
"""Our own chained block hash (index/hashing.py); never an engine's hash."""

SourceId = NewType("SourceId", str)
"""One publishing engine source, ``"<engine>/<dp rank>"``: a dict key and the `source` metric
label. Code that needs the rank reads it from `SourceSpec.rank`, never parses it back."""

EngineHash: TypeAlias = int | bytes
"""A block hash as the engine sent it: int (signed or unsigned 64-bit) or bytes (16/32/64+)."""


def source_id(engine: str, rank: int) -> SourceId:
    """The id of DP rank `rank` of `engine`."""
    return SourceId(f"{engine}/{rank}")


@dataclass(frozen=True)
class SourceSpec:
    """Where one engine source (engine, DP rank) publishes: PUB endpoint, optional replay ROUTER."""

    engine: str
    model: str
    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""
    rank: int = 0
    # The Z85 public key of a CURVE server (a `kvroute relay`, or a publisher holding the
    # secret): the subscriber then connects as a CURVE client. None: plain ZeroMQ.
    curve_server_key: str | None = None

    @property
    def source(self) -> SourceId:
        return source_id(self.engine, self.rank)
