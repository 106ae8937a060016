"""Shared pytest set-up: a ZeroMQ context fixture; tests import `tests.shared_fixtures`;
real-vLLM tests only on request."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# tests/e2e/real_vllm needs two real vLLM engines; `make test-vllm` installs them and sets this.
collect_ignore_glob = [] if os.environ.get("KVROUTE_REAL_VLLM") == "1" else ["e2e/real_vllm/*"]


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    """A ZeroMQ context for one test, destroyed without lingering."""
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)
