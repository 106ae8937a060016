"""`pip install kvroute` (no extras) must run `kvroute serve`: with every module that only the
extras bring made unimportable, the command line builds, the gateway starts and answers
/healthz, /readyz and /metrics (tests/lean_probe.py). The container image installs just the
runtime plus the `kubernetes` extra, so an optional import on the gateway's path would break it.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def _requires(dist: str, extra: str) -> list[Requirement]:
    """The requirements `dist` has with `extra` ("" for none) whose markers hold here."""
    out = []
    for text in md.requires(dist) or ():
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": extra}):
            out.append(req)
    return out


def _closure(roots: Iterable[Requirement]) -> set[str]:
    """Installed distributions `roots` pull in, transitively (normalised names)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        try:
            md.distribution(name)
        except md.PackageNotFoundError:  # not for this platform, or not installed here
            continue
        seen.add(name)
        for extra in ["", *sorted(req.extras)]:
            todo.extend(_requires(name, extra))
    return seen


def _extras_only_modules() -> set[str]:
    """Top-level modules whose every distribution comes only with kvroute's extras."""
    runtime = _closure(_requires("kvroute", ""))
    extras = md.metadata("kvroute").get_all("Provides-Extra") or []
    optional = _closure(r for e in extras for r in _requires("kvroute", e)) - runtime
    modules = set()
    for module, dists in md.packages_distributions().items():
        names = {canonicalize_name(d) for d in dists}
        if names and names <= optional and module.isidentifier():
            modules.add(module)
    return modules


def test_extras_bring_the_modules_the_probe_blocks() -> None:
    # The probe is only as good as this list: these optional imports must be on it.
    blocked = _extras_only_modules()
    for module in ("jinja2", "tokenizers", "matplotlib", "rich", "kubernetes_asyncio", "redis"):
        assert module in blocked, f"{module} is not recognised as an extra's module"
    for module in ("zmq", "msgspec", "starlette", "uvicorn", "httpx", "pydantic", "yaml"):
        assert module not in blocked, f"{module} is a runtime dependency, not an extra's"


def test_gateway_runs_on_the_runtime_dependencies_alone() -> None:
    blocked = sorted(_extras_only_modules())
    result = subprocess.run(
        [sys.executable, "-m", "tests.lean_probe", json.dumps(blocked)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["discovery_importable"] is False
    assert seen["help"] == {"--help": 0, "serve --help": 0, "demo --help": 0}
    # alive, not ready (its one engine is down), metrics served
    assert seen["serve"] == {"/healthz": 200, "/readyz": 503, "/metrics": 200}
