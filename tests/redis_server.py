"""A real redis-server (or valkey-server) per test, on a free port below the ephemeral range so
it can be killed and restarted on the same port; skips with the reason when none can run."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from kvroute.bench.processes import free_port
from tests.polling import eventually

START_DEADLINE_S = 20.0


class RedisServer:
    """One redis-server process the test owns: `start()`, `kill()` (SIGKILL, as a crash),
    `start()` again on the same port, `stop()`. Nothing is persisted. With `binary` None it
    stands for the machine's own server on 127.0.0.1:6379, which a test may not kill."""

    def __init__(self, binary: str | None, workdir: Path, port: int | None = None) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = port if port is not None else free_port(below_ephemeral=True)
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        assert self._proc is None, "already running"
        if self.binary is None:
            pytest.skip("only the machine's own Redis is here, and a test may not restart it")
        self._proc = await asyncio.create_subprocess_exec(
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--protected-mode", "no",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await eventually(self.ping, f"{self.binary} answering on {self.port}", timeout_s=20.0)

    async def ping(self) -> bool:
        if self.binary is not None and (self._proc is None or self._proc.returncode is not None):
            raise AssertionError(f"{self.binary} on port {self.port} exited")
        client = aioredis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(await client.ping())
        except (RedisError, OSError):
            return False
        finally:
            await client.aclose()

    async def kill(self) -> None:
        """SIGKILL: the store disappears as in a crash (connections reset, no goodbye)."""
        if self.binary is None:
            pytest.skip("only the machine's own Redis is here, and a test may not kill it")
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        if self.binary is not None:
            await self.kill()


@contextlib.asynccontextmanager
async def redis_server(workdir: Path) -> AsyncIterator[RedisServer]:
    """A started server of our own; without a server binary, the machine's own Redis on
    127.0.0.1:6379 (tests that kill it skip); neither: the test is skipped, saying why."""
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        machine = RedisServer(None, workdir, port=6379)
        if not await machine.ping():
            pytest.skip(
                "no redis-server or valkey-server binary and no Redis on 127.0.0.1:6379 "
                "(Debian: apt-get install redis-server)"
            )
        yield machine
        return
    server = RedisServer(binary, workdir)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
