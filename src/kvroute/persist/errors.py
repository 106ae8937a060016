"""Why a snapshot could not be written (`SnapshotError`) or was refused at start (`SnapshotRefused`
with a `RefuseReason`, the `reason` label of `kvroute_snapshot_refused_total`)."""

from __future__ import annotations

import enum

from kvroute.errors import KvrouteError

__all__ = ["RefuseReason", "SnapshotError", "SnapshotRefused"]


class RefuseReason(enum.StrEnum):
    """Why a snapshot file was not loaded; every reason means the gateway starts cold."""

    MISSING = "missing"  # no file: the first start, not an error; start cold quietly
    UNREADABLE = "unreadable"  # there is something, but it cannot be opened or mapped
    TRUNCATED = "truncated"  # the file ends before the end its header records
    CORRUPT = "corrupt"  # not a snapshot, or a checksum or the layout does not hold
    VERSION = "version"  # an intact snapshot in a format version (or flag) this build lacks
    FLEET = "fleet"  # an intact snapshot written for another fleet


class SnapshotError(KvrouteError):
    """A snapshot could not be written (the message names the path, what failed and that the
    previous snapshot was kept); the base of `SnapshotRefused`."""


class SnapshotRefused(SnapshotError):
    """Raised by `read_snapshot`: the file is not loaded and the gateway starts cold. `message` is
    one line for the operator (path, what was expected, what was found, "starting cold")."""

    def __init__(self, reason: RefuseReason, message: str, path: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.path = path
