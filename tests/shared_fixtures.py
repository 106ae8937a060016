"""The one way tests reach ../shared: KVROUTE_SHARED, or ../shared beside the project root."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@cache
def shared_dir() -> Path:
    """The shared folder; fails loudly (not a skip) when it is missing."""
    path = Path(os.environ.get("KVROUTE_SHARED", PROJECT_ROOT.parent / "shared")).resolve()
    if not (path / "fixtures" / "vllm_events").is_dir():
        raise RuntimeError(
            f"shared folder not found at {path} (expected fixtures/vllm_events inside); "
            "set KVROUTE_SHARED to the folder that holds fixtures/ and reference/"
        )
    return path


def event_fixtures_dir() -> Path:
    return shared_dir() / "fixtures" / "vllm_events"


def fixture_versions() -> list[str]:
    """Every vLLM release with fixtures, oldest first."""
    dirs = [p.name for p in event_fixtures_dir().iterdir() if (p / "expected.json").is_file()]
    return sorted(dirs, key=lambda v: tuple(int(x) for x in v.split(".")))


@dataclass(frozen=True)
class Scenario:
    version: str
    name: str
    payload: bytes
    expected: dict[str, Any]  # {"ts", "data_parallel_rank", "events": [...]}

    @property
    def id(self) -> str:
        return f"{self.version}-{self.name}"


@cache
def expected_json(version: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (event_fixtures_dir() / version / "expected.json").read_text()
    )
    return data


def scenarios() -> list[Scenario]:
    """Every (release, scenario) payload with its expected meaning, read from the files."""
    out = []
    for version in fixture_versions():
        for name, meaning in expected_json(version)["scenarios"].items():
            payload = (event_fixtures_dir() / version / f"{name}.msgpack").read_bytes()
            out.append(Scenario(version, name, payload, meaning))
    return out


def frames(version: str, kind: str) -> list[list[bytes]]:
    """live_frames.json or replay_frames.json as lists of raw frames."""
    data = json.loads((event_fixtures_dir() / version / f"{kind}_frames.json").read_text())
    messages = data if isinstance(data, list) else data["messages"]
    return [[bytes.fromhex(f) for f in msg] for msg in messages]
