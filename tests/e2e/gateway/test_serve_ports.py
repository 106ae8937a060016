"""`kvroute serve` binds its ports (HTTP, the endpoint picker's) before anything starts (issue
15): a port in use is one line on stderr and exit 2, and no engine ever hears from it; a free
port serves as before."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from kvroute.bench.processes import free_port
from kvroute.errors import ConfigError
from kvroute.gateway import BackgroundServer, create_app
from kvroute.gateway.picker import PickerServer
from kvroute.gateway.server import listen
from kvroute.metrics import Metrics
from kvroute.settings import load_settings
from tests.e2e.gateway.test_tls_and_connections import _self_signed

DEADLINE_S = 60.0  # a loaded 2-core machine imports kvroute in a few seconds
SERVING = re.compile(r"msg=serving url=(\S+)")


def _env(**settings: str) -> dict[str, str]:
    """The environment without the caller's KVROUTE_* settings (the index and receive
    implementations `make test` picks excepted), plus `settings`."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("KVROUTE_") or k.endswith("_IMPL")
    }
    return {**env, "KVROUTE_LOG_FORMAT": "kv", "PYTHONUNBUFFERED": "1", **settings}


def _listener() -> socket.socket:
    """A port that something listens on and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


def _port(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def _connections(sock: socket.socket) -> int:
    """How many connections reached `sock` (the kernel queues each until accepted, even one
    whose client has gone)."""
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


@dataclass
class Engine:
    """A fleet file naming one engine whose HTTP, event and replay ports are listeners of the
    test: a gateway that starts health checks or subscribes connects to them."""

    fleet_file: Path
    http: socket.socket
    events: socket.socket
    replay: socket.socket

    def contacted(self) -> dict[str, int]:
        return {
            name: _connections(sock)
            for name, sock in (
                ("http", self.http),
                ("events", self.events),
                ("replay", self.replay),
            )
        }


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    http, events, replay = _listener(), _listener(), _listener()
    fleet_file = tmp_path / "fleet.yaml"
    entry = {
        "name": "e0",
        "url": f"http://127.0.0.1:{_port(http)}",
        "model": "m",
        "events": f"tcp://127.0.0.1:{_port(events)}",
        "replay": f"tcp://127.0.0.1:{_port(replay)}",
    }
    fleet_file.write_text(yaml.safe_dump({"engines": [entry]}))
    try:
        yield Engine(fleet_file, http, events, replay)
    finally:
        for sock in (http, events, replay):
            sock.close()


def _serve(fleet_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvroute.cli", "serve", "--fleet", str(fleet_file),
         "--host", "127.0.0.1", "--log-level", "info", *args],
        capture_output=True, text=True, timeout=DEADLINE_S, env=_env(),
    )  # fmt: skip


def test_a_port_in_use_is_one_line_and_exit_2_before_any_engine_hears_from_it(
    engine: Engine,
) -> None:
    with _listener() as taken:
        port = _port(taken)
        result = _serve(engine.fleet_file, "--port", str(port))
    err = result.stderr
    assert result.returncode == 2, err
    # At info, any start-up work (uvicorn's lifespan, the gateway) would have logged lines.
    assert len(err.splitlines()) == 1, err
    assert f"127.0.0.1:{port}" in err and "in use" in err, err
    assert "--port / KVROUTE_PORT" in err and "Traceback" not in err, err
    assert engine.contacted() == {"http": 0, "events": 0, "replay": 0}, err


def test_a_picker_port_in_use_is_one_line_and_exit_2_before_any_engine_hears_from_it(
    engine: Engine,
) -> None:
    with _listener() as taken:
        port = _port(taken)
        result = _serve(engine.fleet_file, "--port", "0", "--picker-port", str(port))
    err = result.stderr
    assert result.returncode == 2, err
    assert len(err.splitlines()) == 1, err
    assert "endpoint picker" in err and f"127.0.0.1:{port}" in err and "in use" in err, err
    assert "--picker-port / KVROUTE_PICKER_PORT" in err and "Traceback" not in err, err
    assert engine.contacted() == {"http": 0, "events": 0, "replay": 0}, err


async def test_the_app_binds_the_picker_port_before_it_starts_the_gateway(engine: Engine) -> None:
    # Taken after `kvroute serve` checked it (or an app served another way): the start-up fails
    # on it before the gateway subscribes or probes an engine.
    with _listener() as taken:
        settings = load_settings(
            fleet_file=engine.fleet_file,
            host="127.0.0.1",
            port=0,
            picker_port=_port(taken),
            log_level="warning",
        )
        with pytest.raises(ConfigError, match="failed to start"):
            await BackgroundServer(create_app(settings, metrics=Metrics())).start()
    assert engine.contacted() == {"http": 0, "events": 0, "replay": 0}


async def test_a_start_up_that_fails_after_binding_the_picker_port_frees_it(
    engine: Engine,
) -> None:
    port = free_port(below_ephemeral=True)
    settings = load_settings(
        fleet_file=engine.fleet_file, host="127.0.0.1", port=0, picker_port=port
    )
    app = create_app(settings, metrics=Metrics())
    engine.fleet_file.unlink()  # the gateway is built at start-up, after the picker's port
    with pytest.raises(ConfigError, match="failed to start"):
        await BackgroundServer(app).start()
    for sock in listen("127.0.0.1", port):  # an unstarted gRPC server would still hold it
        sock.close()


async def test_a_second_picker_on_the_port_of_the_first_fails_instead_of_sharing_it() -> None:
    first = PickerServer("127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{first.port}"):
            PickerServer("127.0.0.1", first.port)
    finally:
        await first.stop(grace=0)


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_a_free_port_serves_on_the_socket_bound_first(
    engine: Engine, tmp_path: Path, tls: bool
) -> None:
    settings: dict[str, str] = {}
    verify: ssl.SSLContext | bool = False
    if tls:
        cert, key = _self_signed(tmp_path)
        settings = {"KVROUTE_TLS_CERT_FILE": str(cert), "KVROUTE_TLS_KEY_FILE": str(key)}
        verify = ssl.create_default_context(cafile=str(cert))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvroute.cli", "serve", "--fleet", str(engine.fleet_file),
        "--host", "127.0.0.1", "--port", "0", "--log-level", "info",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=_env(**settings),
    )  # fmt: skip
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(DEADLINE_S):
            while (match := SERVING.search(seen[-1] if seen else "")) is None:
                line = (await proc.stderr.readline()).decode()
                assert line, "kvroute serve exited before serving:\n" + "".join(seen)
                seen.append(line)
        url = match.group(1)
        assert url.startswith("https://" if tls else "http://"), url
        async with httpx.AsyncClient(verify=verify, trust_env=False, timeout=30) as http:
            response = await http.get(f"{url}/healthz")
        assert response.status_code == 200, response.text
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rest = (await asyncio.wait_for(proc.stderr.read(), DEADLINE_S)).decode()
        code = await asyncio.wait_for(proc.wait(), DEADLINE_S)
    log = "".join(seen) + rest
    # uvicorn shuts down, then raises the signal it caught again: the exit is SIGTERM's.
    assert code in (0, -signal.SIGTERM) and "Traceback" not in log, log
