"""`kvroute sim` as a process: fleet file with real ports, serving, clean exit on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.polling import eventually

# Drive the sim subcommand through its own register(), independent of the other subcommands.
_DRIVER = (
    "import argparse, sys\n"
    "from kvroute.sim import cli\n"
    "p = argparse.ArgumentParser(prog='kvroute')\n"
    "cli.register(p.add_subparsers(dest='command', required=True))\n"
    "a = p.parse_args(sys.argv[1:])\n"
    "sys.exit(a.func(a))\n"
)


async def _wait_file(path: Path, proc: asyncio.subprocess.Process) -> None:
    await eventually(
        lambda: path.exists() or proc.returncode is not None,
        "the fleet file (or an exit)",
        timeout_s=20,
        interval_s=0.05,
    )
    assert path.exists(), f"no fleet file (exit code {proc.returncode})"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_sim_cli_writes_fleet_file_serves_and_exits_cleanly(
    tmp_path: Path, sig: signal.Signals
) -> None:
    out = tmp_path / "fleet.yaml"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _DRIVER, "sim", "--engines", "2", "--dp-ranks", "2",
        "--model", "m", "--lora", "ad", "--speed", "20", "--vllm-version", "0.26.0",
        "--fleet-out", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await _wait_file(out, proc)
        fleet = yaml.safe_load(out.read_text())["engines"]
        assert [e["name"] for e in fleet] == ["engine-0", "engine-1"]
        assert all(e["dp_ranks"] == [0, 1] and e["lora"] == ["ad"] for e in fleet)
        async with httpx.AsyncClient(timeout=10) as c:
            for e in fleet:
                r = await c.post(
                    e["url"] + "/v1/completions",
                    json={"model": "m", "prompt": "hi", "max_tokens": 2},
                )
                assert r.status_code == 200 and "x-sim-ttft-ms" in r.headers
        proc.send_signal(sig)
        code = await asyncio.wait_for(proc.wait(), 15)
        assert code == 0, (await proc.stderr.read()).decode() if proc.stderr else ""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sim_cli_fixed_base_ports_follow_the_stride(tmp_path: Path) -> None:
    # find a free range of 40 ports for each base (HTTP, events, replay)
    def free_base() -> int:
        for _ in range(50):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
            s.close()
            if base + 40 > 65535:
                continue
            ok = True
            for p in range(base, base + 20):
                t = socket.socket()
                try:
                    t.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                finally:
                    t.close()
                if not ok:
                    break
            if ok:
                return base
        raise AssertionError("no free port range")

    http, events = free_base(), free_base()
    while abs(events - http) < 20:
        events = free_base()
    out = tmp_path / "fleet.yaml"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _DRIVER, "sim", "--engines", "2", "--dp-ranks", "2",
        "--http-base-port", str(http), "--events-base-port", str(events), "--no-replay",
        "--fleet-out", str(out), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await _wait_file(out, proc)
        fleet = yaml.safe_load(out.read_text())["engines"]
        assert [e["url"] for e in fleet] == [
            f"http://127.0.0.1:{http}", f"http://127.0.0.1:{http + 10}"
        ]  # fmt: skip
        assert [e["events"] for e in fleet] == [
            f"tcp://127.0.0.1:{events}", f"tcp://127.0.0.1:{events + 10}"
        ]  # fmt: skip
        assert all("replay" not in e for e in fleet)
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sim_cli_reports_an_unwritable_fleet_file_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "no-such-dir" / "fleet.yaml"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _DRIVER, "sim", "--engines", "1", "--model", "m",
        "--fleet-out", str(out), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    message = stderr.decode().strip()
    assert proc.returncode == 2, message
    assert "Traceback" not in message and len(message.splitlines()) == 1
    assert "--fleet-out" in message and "cannot write" in message
