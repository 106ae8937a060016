"""Two real vLLM CPU engines and `kvroute serve` for tests/e2e/real_vllm (`make test-vllm`)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.real_vllm.processes import KvrouteServer, VllmEngine, port_is_free

# A prompt the first engine serves before kvroute starts: kvroute must learn it by replay.
EARLY_PROMPT = (
    "before the router started, an early visitor asked the engine about the history of the "
    "lighthouse keepers on the northern coast, their long winters, the oil lamps, the logbooks "
    "and the ships they guided home through the fog and the storms of every season"
)


_TAKEN: set[int] = set()


def _free_port() -> int:
    """A free port below the kernel's ephemeral range (32768+ here).

    kvroute reconnects to a restarting engine's ports on loopback; an ephemeral port picked
    for such a connect can be the very port the engine is about to bind (TCP self-connect),
    and the engine then fails with "Address already in use".
    """
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20_000, 32_000)
        if port not in _TAKEN and port_is_free(port):
            _TAKEN.add(port)
            return port
    raise RuntimeError("no free port in 20000-32000")


@dataclass
class Cluster:
    engines: list[VllmEngine]
    router: KvrouteServer
    early_engine: str

    def engine(self, name: str) -> VllmEngine:
        return next(e for e in self.engines if e.name == name)


def _write_fleet(path: Path, engines: list[VllmEngine]) -> None:
    lines = ["engines:"]
    for e in engines:
        lines += [
            f"  - name: {e.name}",
            "    model: tiny",
            f"    url: {e.url}",
            f"    events: tcp://127.0.0.1:{e.pub_port}",
            f"    replay: tcp://127.0.0.1:{e.replay_port}",
            "    topic: kv",
        ]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = Path(os.environ["KVROUTE_VLLM_ROOT"])
    if not (root / "venv" / "bin" / "vllm").exists():
        raise RuntimeError(f"no vLLM install under {root}; run `make test-vllm`")
    log_dir = Path(os.environ.get("KVROUTE_VLLM_LOGS", tmp_path_factory.mktemp("logs")))
    log_dir.mkdir(parents=True, exist_ok=True)
    engines = [
        VllmEngine(root, i, _free_port(), _free_port(), _free_port(), log_dir) for i in range(2)
    ]
    fleet = tmp_path_factory.mktemp("fleet") / "fleet.yaml"
    _write_fleet(fleet, engines)
    router = KvrouteServer(fleet, _free_port(), log_dir)
    try:
        for e in engines:
            e.start()
        for e in engines:
            e.wait_ready()
        # Serve a request before kvroute exists: its events wait in the replay buffer.
        engines[0].complete(EARLY_PROMPT)
        router.start()
        router.wait_ready()
        yield Cluster(engines, router, engines[0].name)
    finally:
        router.stop()
        for e in engines:
            e.stop()
        print(f"\nreal-vLLM logs: {log_dir}")
