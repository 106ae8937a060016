"""Shared pytest set-up: a ZeroMQ context fixture, loggers restored after each test; tests import
`tests.shared_fixtures`; real-vLLM tests only on request."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator, Iterator
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


_CLI_LOGGERS = ("kvroute", "uvicorn", "uvicorn.error", "uvicorn.access")


@pytest.fixture(autouse=True)
def _restore_loggers() -> Iterator[None]:
    """A CLI entry point run in-process (`configure_logging`) gives kvroute's loggers their own
    stderr handler and stops them propagating, which would hide every later test's records from
    `caplog`: put them back as they were."""
    saved = []
    for name in _CLI_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.level, logger.propagate, logger.disabled))
    yield
    for logger, handlers, level, propagate, disabled in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
        logger.disabled = disabled
