"""Where routing reads an engine's load from: one enum for settings, flags, fleet and bench."""

from __future__ import annotations

import enum

__all__ = ["LoadSource"]


class LoadSource(enum.StrEnum):
    """What counts as an engine's load (fleet/load.py; docs/design.md §15)."""

    LOCAL = "local"  # the requests kvroute sent (this replica, plus the shared store's)
    ENGINE = "engine"  # the engine's reported running + waiting
    BLENDED = "blended"  # the report plus what kvroute sent or saw end since
