"""Run by tests/unit/test_lean_install.py as `python -m tests.lean_probe NAMES`: with the
modules named in NAMES (a JSON list) made unimportable, as where only kvroute's runtime
dependencies are installed (`pip install kvroute`), check that the command line builds,
`kvroute serve` starts and answers its probes and metrics, and discovery (an extra) is out of
reach. Prints one JSON object with what it saw."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.abc
import importlib.machinery
import io
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType


class _Blocked(importlib.abc.MetaPathFinder):
    """Refuses the named top-level packages (and everything under them)."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked)", name=fullname)
        return None


def _help(argv: list[str]) -> int:
    from kvroute.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as exc:  # --help exits 0
            return int(exc.code or 0)
    return 0


async def _serve(fleet: Path) -> dict[str, int]:
    import httpx

    from kvroute.gateway import BackgroundServer, create_app
    from kvroute.settings import load_settings

    settings = load_settings(fleet_file=fleet, port=0, log_level="error", prompt_workers=0)
    statuses: dict[str, int] = {}
    async with (
        BackgroundServer(create_app(settings)) as server,
        httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=10.0) as http,
    ):
        for path in ("/healthz", "/readyz", "/metrics"):
            statuses[path] = (await http.get(path)).status_code
    return statuses


def main() -> None:
    blocked = set(json.loads(sys.argv[1]))
    sys.meta_path.insert(0, _Blocked(blocked))
    seen: dict[str, object] = {}
    # Discovery needs the kubernetes extra: it must fail to import here, or this proves nothing.
    try:
        importlib.import_module("kvroute.fleet.kubernetes")
        seen["discovery_importable"] = True
    except ImportError:
        seen["discovery_importable"] = False
    seen["help"] = {
        " ".join(argv): _help(argv)
        for argv in (["--help"], ["serve", "--help"], ["demo", "--help"])
    }
    with tempfile.TemporaryDirectory() as tmp:
        fleet = Path(tmp) / "fleet.yaml"
        # One engine on a loopback port nothing listens on: the gateway starts, is alive, is not
        # ready (no healthy engine), and serves its metrics.
        fleet.write_text(
            "engines:\n"
            "  - name: e0\n"
            "    model: m\n"
            "    url: http://127.0.0.1:9\n"
            "    events: tcp://127.0.0.1:9\n"
        )
        seen["serve"] = asyncio.run(_serve(fleet))
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
