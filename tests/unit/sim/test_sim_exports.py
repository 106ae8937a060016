"""kvroute.sim exports its documented surface and shares no code path with the router."""

from __future__ import annotations

import ast
from pathlib import Path

import kvroute.sim


def test_all_lists_the_public_names() -> None:
    for name in kvroute.sim.__all__:
        assert hasattr(kvroute.sim, name), name
    assert sorted(kvroute.sim.__all__) == sorted(
        [
            "PORT_STRIDE",
            "BlockPool",
            "CachedBlock",
            "Generation",
            "SchedulerConfig",
            "SimConfig",
            "SimEngine",
            "SimFleet",
            "SimRequest",
            "SimScheduler",
            "SimTokenizer",
            "StepOutcome",
            "create_engine_app",
        ]
    )


def test_sim_imports_only_the_publisher_and_wire_types_from_kvroute() -> None:
    allowed = {
        "kvroute.errors",
        "kvroute.events.publisher",
        "kvroute.events.wire",
    }
    folder = Path(kvroute.sim.__file__).parent
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path.name}: module docstring missing"
        assert len(ast.get_docstring(tree).splitlines()) <= 2, path.name  # type: ignore[union-attr]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module
            elif isinstance(node, ast.Import):
                mod = node.names[0].name
            else:
                continue
            if mod.startswith("kvroute.") and not mod.startswith("kvroute.sim"):
                assert mod in allowed, f"{path.name} imports {mod}"
            assert not mod.startswith("zmq"), f"{path.name} imports zmq (only events/ may)"
