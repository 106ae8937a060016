"""The package layering of docs/architecture.md: which kvroute package may import which, that
`kvroute.core` needs nothing but the standard library and msgspec, and what the core loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import kvroute

SRC = Path(kvroute.__file__).parent

# Package (or top-level module) -> the kvroute packages and modules its code may import.
# core <- index <- routing; events -> core, index; fleet -> core; gateway -> all but bench, sim.
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "errors": frozenset(),
    "index": frozenset({"core", "errors"}),
    "routing": frozenset({"core", "index", "errors"}),
    "events": frozenset({"core", "index", "errors"}),
    "fleet": frozenset({"core", "errors"}),
    "tokenize": frozenset({"core", "errors"}),
    "upstream": frozenset({"core", "errors"}),
    "metrics": frozenset({"core", "errors"}),
    "persist": frozenset({"core", "index", "errors"}),
    "settings": frozenset({"core", "errors", "index", "routing"}),
    "gateway": frozenset(
        {
            "core",
            "errors",
            "index",
            "routing",
            "events",
            "fleet",
            "tokenize",
            "upstream",
            "metrics",
            "persist",
            "settings",
        }
    ),
    # The simulator shares only the wire with the router (it plays the engine).
    "sim": frozenset({"core", "errors", "events"}),
    # The relay sidecar forwards the wire (events' CURVE keys) and exports its own counters.
    "relay": frozenset({"core", "errors", "events", "metrics"}),
}
# Drivers from outside the service: they may use anything, and nothing above may import them.
UNCHECKED = frozenset({"bench", "cli", "__init__"})
# What `kvroute.core` may import besides the standard library.
CORE_THIRD_PARTY = frozenset({"msgspec"})
# Heavy I/O libraries the index and the policies must never pull in.
IO_LIBRARIES = ("zmq", "httpx", "starlette", "prometheus_client", "uvicorn", "pydantic")


def _imports(module: Path) -> Iterator[str]:
    """Every module name `module` imports, at any depth of its code."""
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def _unit(path: Path) -> str:
    """The package or top-level module a source file belongs to."""
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_unit_of_the_service_is_in_the_table() -> None:
    units = {_unit(p) for p in _modules()} - UNCHECKED - {"py"}
    assert units <= ALLOWED.keys(), units - ALLOWED.keys()


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.relative_to(SRC).as_posix())
def test_imports_follow_the_layering(path: Path) -> None:
    unit = _unit(path)
    if unit in UNCHECKED:
        return
    allowed = ALLOWED[unit] | {unit}
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] != "kvroute" or len(parts) < 2:
            continue
        assert parts[1] in allowed, f"{path.relative_to(SRC)} imports {name}"


@pytest.mark.parametrize("path", sorted((SRC / "core").rglob("*.py")), ids=lambda p: p.name)
def test_core_imports_only_the_standard_library_and_msgspec(path: Path) -> None:
    for name in _imports(path):
        top = name.split(".")[0]
        if top in ("kvroute", "__future__"):
            continue
        assert top in sys.stdlib_module_names or top in CORE_THIRD_PARTY, name


def test_importing_the_index_and_routing_loads_no_io_library() -> None:
    code = (
        "import sys, kvroute.index, kvroute.routing, kvroute.core\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({IO_LIBRARIES!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# Each outside system is reached through one package (its seam); sim and bench play engines and
# clients from outside the service, so they may use these libraries too.
SEAMS = {
    "zmq": {"events", "relay"},
    "httpx": {"upstream"},
    "prometheus_client": {"metrics"},
    "kubernetes_asyncio": {"fleet"},  # fleet/kubernetes.py, pod discovery
    "redis": {"fleet"},  # fleet/shared_state.py, the store several replicas share
    "aiohttp": {"fleet"},  # kubernetes_asyncio's transport, whose errors it raises
    "grpc": {"gateway"},  # gateway/picker.py, the Envoy ext_proc service
    "grpc_health": {"gateway"},
    "starlette": {"gateway"},
    "uvicorn": {"gateway"},
}


@pytest.mark.parametrize("library", sorted(SEAMS))
def test_each_io_library_is_imported_by_its_seam_only(library: str) -> None:
    for path in _modules():
        unit = _unit(path)
        if unit in UNCHECKED or unit == "sim":
            continue
        for name in _imports(path):
            if name.split(".")[0] == library:
                assert unit in SEAMS[library], f"{path.relative_to(SRC)} imports {name}"


def test_the_simulator_shares_only_the_wire_with_the_router() -> None:
    # It plays the engine: vLLM's events and publisher, nothing of the router's code paths.
    allowed = ("kvroute.sim", "kvroute.core", "kvroute.errors")
    # CURVE keys are the wire's too: the simulator can publish encrypted (events/curve.py).
    wire = {"kvroute.events.publisher", "kvroute.events.vllm_events", "kvroute.events.curve"}
    for path in sorted((SRC / "sim").rglob("*.py")):
        for name in _imports(path):
            if name.startswith("kvroute"):
                assert name.startswith(allowed) or name in wire, (path.name, name)


# The synchronous core (docs/design.md §1): no coroutine, no await, no lock.
SYNC = (
    "index",
    "routing",
    "events/tracker.py",
    "events/normalise.py",
    "core",
    "persist/snapshot_file.py",
    "persist/index_snapshot.py",
    "persist/layout.py",
)


@pytest.mark.parametrize("where", SYNC)
def test_the_synchronous_core_has_no_async_code(where: str) -> None:
    target = SRC / where
    for path in [target] if target.is_file() else sorted(target.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Protocol"):
                continue
            if "engine_client" in path.name:
                continue  # core's EngineClient protocol describes async I/O; it does none
            assert not isinstance(node, ast.AsyncFunctionDef | ast.Await), path
        for name in _imports(path):
            assert name.split(".")[0] not in ("asyncio", "threading", "socket"), (path, name)
