"""Warm restarts: the snapshot file the gateway writes its index and recovery state to, atomically,
and refuses (with a reason for the counter) when it is damaged, foreign or missing."""

from kvroute.persist.errors import RefuseReason, SnapshotError, SnapshotRefused
from kvroute.persist.layout import FORMAT_VERSION, fleet_fingerprint
from kvroute.persist.snapshot_file import (
    Payload,
    Snapshot,
    SnapshotInfo,
    read_snapshot,
    remove_stale_temp_files,
    write_snapshot,
)

__all__ = [
    "FORMAT_VERSION",
    "Payload",
    "RefuseReason",
    "Snapshot",
    "SnapshotError",
    "SnapshotInfo",
    "SnapshotRefused",
    "fleet_fingerprint",
    "read_snapshot",
    "remove_stale_temp_files",
    "write_snapshot",
]
