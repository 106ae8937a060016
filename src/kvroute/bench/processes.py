"""Child processes of the benchmarks: a gateway as deployed (`kvroute serve`), any other
server with its log file, and free ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

__all__ = ["READY_TIMEOUT_S", "ChildProcess", "GatewayProcess", "free_port", "rss_bytes"]

READY_TIMEOUT_S = 60.0


def rss_bytes(pid: int, *, children: bool = False) -> int:
    """Resident set size of process `pid` (with `children`, plus its direct children's: a
    gateway and its prompt workers), from /proc; 0 when unknown."""
    pids = [pid]
    if children:
        with contextlib.suppress(OSError, ValueError):
            pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    total = 0
    for p in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


def free_port(below_ephemeral: bool = False) -> int:
    """A free TCP port; `below_ephemeral`: one no outgoing connection can take meanwhile (a
    store restarted on the same port)."""
    if not below_ephemeral:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
            return port
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(100):
        candidate = rng.randrange(10_000 if low > 12_000 else 1_024, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return candidate
    raise RuntimeError("no free TCP port below the ephemeral range")


class ChildProcess:
    """A child process with its log file."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def spawn(self, cmd: Sequence[str], env: dict[str, str] | None = None) -> None:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
            )

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def exited(self) -> bool:
        return self.proc is None or self.proc.returncode is not None

    async def stop(self, kill: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        if kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


class GatewayProcess(ChildProcess):
    """`kvroute serve` in its own process, as it is deployed: `start` with a fleet file and
    settings (without the `KVROUTE_` prefix), `wait_ready`, `stop` (`kill=True`: SIGKILL)."""

    def __init__(self, index: int, workdir: Path) -> None:
        super().__init__(f"replica-{index}", workdir / f"replica-{index}.log")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def start(
        self,
        fleet_file: Path,
        settings: dict[str, str],
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        """`extra_env`: more variables (such as PYTHONPATH: another kvroute's source tree)."""
        env = {
            **os.environ,
            **(extra_env or {}),
            **{f"KVROUTE_{k.upper()}": v for k, v in settings.items()},
        }
        env.update(
            KVROUTE_FLEET_FILE=str(fleet_file),
            KVROUTE_HOST="127.0.0.1",
            KVROUTE_PORT=str(self.port),
            KVROUTE_LOG_LEVEL="warning",
        )
        await self.spawn([sys.executable, "-m", "kvroute.cli", "serve"], env)

    async def wait_ready(self, http: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.exited():
                raise RuntimeError(f"{self.name} exited: {self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{self.url}/readyz")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready: {self.tail()}")
            await asyncio.sleep(0.1)
