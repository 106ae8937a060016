"""Shared pytest set-up: the tests folder is importable (tests.shared_fixtures)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
