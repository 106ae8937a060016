"""Shared pytest set-up: tests import `tests.shared_fixtures`; real-vLLM tests only on request."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# tests/e2e/real_vllm needs two real vLLM engines; `make test-vllm` installs them and sets this.
collect_ignore_glob = [] if os.environ.get("KVROUTE_REAL_VLLM") == "1" else ["e2e/real_vllm/*"]
