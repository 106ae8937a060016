"""kvroute.routing exports its documented surface and stays free of I/O (STYLE.md §6, §15)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import kvroute.routing


def test_all_lists_the_public_names() -> None:
    for name in kvroute.routing.__all__:
        assert hasattr(kvroute.routing, name), name
    assert sorted(kvroute.routing.__all__) == sorted(
        [
            "GUARD_POLICY_NAME",
            "POLICY_NAMES",
            "Candidate",
            "CostWeights",
            "Decision",
            "EngineScore",
            "KvAwarePolicy",
            "LeastLoadedPolicy",
            "Policy",
            "RandomPolicy",
            "RoundRobinPolicy",
            "kv_cost",
            "make_policy",
        ]
    )


def test_routing_has_no_async_and_no_network_imports() -> None:
    package = Path(inspect.getfile(kvroute.routing)).parent
    for module in package.glob("*.py"):
        tree = ast.parse(module.read_text())
        for node in ast.walk(tree):
            assert not isinstance(node, ast.AsyncFunctionDef | ast.Await), module
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                for name in names:
                    assert not name.startswith(("zmq", "httpx", "asyncio", "socket")), module
        docstring = ast.get_docstring(tree)
        assert docstring is not None and len(docstring.splitlines()) <= 2, module
