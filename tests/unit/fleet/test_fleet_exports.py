"""The public surfaces of kvroute.fleet and kvroute.tokenize, and their module docstrings."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

EXPECTED = {
    "kvroute.fleet": [
        "KV_CACHE_USAGE",
        "NUM_REQUESTS_RUNNING",
        "NUM_REQUESTS_WAITING",
        "ChangeCallback",
        "EngineSpec",
        "EngineState",
        "FileFleetSource",
        "Fleet",
        "FleetSource",
        "load_fleet_file",
        "offset_endpoint",
        "parse_fleet",
        "parse_vllm_gauges",
    ],
    "kvroute.tokenize": ["CachingTokenizer", "LocalTokenizer", "RemoteTokenizer", "Tokenizer"],
}


@pytest.mark.parametrize("package", sorted(EXPECTED))
def test_all_lists_exactly_the_public_names(package: str) -> None:
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(EXPECTED[package])
    for name in module.__all__:
        assert hasattr(module, name), name


@pytest.mark.parametrize("package", sorted(EXPECTED))
def test_every_module_opens_with_a_short_docstring(package: str) -> None:
    folder = Path(inspect.getfile(importlib.import_module(package))).parent
    for path in folder.glob("*.py"):
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring is not None and len(docstring.splitlines()) <= 2, path
