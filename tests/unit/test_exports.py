"""The documented surface of the packages and top-level modules without an exports test of
their own, and the one-job docstring every module opens with (STYLE.md §15)."""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import kvroute

SRC = Path(kvroute.__file__).parent

EXPORTS = {
    "kvroute": ["__version__"],
    "kvroute.bench": [],
    "kvroute.errors": [
        "ConfigError",
        "EngineError",
        "IndexStateError",
        "KvrouteError",
        "TokenizeError",
        "WireError",
    ],
    "kvroute.gateway": [
        "ENGINE_HEADER",
        "BackgroundServer",
        "Gateway",
        "RouteOutcome",
        "create_app",
        "http_client",
        "serve_forever",
    ],
    "kvroute.metrics": ["DropReason", "EventCounters", "Metrics", "ReplayOutcome", "ResetCause"],
    "kvroute.settings": [
        "ENV_PREFIX",
        "LogFormat",
        "PolicyName",
        "Settings",
        "load_settings",
        "settings_env_names",
        "settings_markdown_table",
    ],
    "kvroute.tokenize": ["CachingTokenizer", "LocalTokenizer", "RemoteTokenizer", "Tokenizer"],
}
# The service's packages; `bench` and `sim` drive it from outside and must not be imported by it.
SERVICE = ("events", "index", "tokenize", "routing", "fleet", "gateway")


@pytest.mark.parametrize("module_name", sorted(EXPORTS))
def test_all_lists_the_public_names(module_name: str) -> None:
    module = importlib.import_module(module_name)
    exported: list[str] = module.__all__
    for name in exported:
        assert hasattr(module, name), f"{module_name}.{name}"
    assert sorted(exported) == sorted(EXPORTS[module_name])


def test_every_package_lists_all_in_its_init() -> None:
    for init in SRC.rglob("__init__.py"):
        tree = ast.parse(init.read_text())
        assigned = {
            t.id
            for node in tree.body
            if isinstance(node, ast.Assign | ast.AnnAssign)
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(t, ast.Name)
        }
        assert "__all__" in assigned, init


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")), ids=str
)
def test_every_module_opens_with_a_docstring_of_at_most_two_lines(path: str) -> None:
    docstring = ast.get_docstring(ast.parse((SRC / path).read_text()))
    assert docstring, f"{path}: no module docstring"
    if path == "errors.py":
        return  # STYLE.md §9: its docstring draws the exception tree
    assert len(docstring.splitlines()) <= 2, f"{path}: {docstring!r}"


def _imports(module: Path) -> Iterator[str]:
    """Every module name `module` imports, at any depth of its code."""
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_the_service_never_imports_bench_or_sim() -> None:
    for package in SERVICE:
        for module in (SRC / package).rglob("*.py"):
            for name in _imports(module):
                assert not name.startswith(("kvroute.bench", "kvroute.sim")), (module, name)


def test_the_simulator_shares_only_the_wire_with_the_router() -> None:
    # ARCHITECTURE.md: sim/ shares no code paths with the router beyond events/publisher.py
    # (and the event types and errors that module speaks in).
    allowed = ("kvroute.sim", "kvroute.events.publisher", "kvroute.events.wire", "kvroute.errors")
    for module in (SRC / "sim").rglob("*.py"):
        for name in _imports(module):
            if name.startswith("kvroute"):
                assert name.startswith(allowed), (module, name)
