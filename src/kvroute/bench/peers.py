"""Where the peer systems of the side-by-side benchmarks live: `.venv-peers` (`make bench-peers`)
and the package each one needs there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["PEERS_VENV", "InstalledPeer", "PeerMissing", "find_peer"]

PEERS_VENV: Final = ".venv-peers"


class PeerMissing(Exception):
    """The peer system asked for is not installed."""


@dataclass(frozen=True)
class InstalledPeer:
    """A peer's venv: its python, site-packages and the installed distribution's version."""

    python: Path
    site: Path
    version: str


def _checkout() -> Path:
    return Path(__file__).resolve().parents[3]


def find_peer(venv: Path | None, module: Path, dist: str, what: str) -> InstalledPeer:
    """The first venv (`venv`, else `.venv-peers` in the working directory, then in the source
    checkout) whose site-packages holds `module` (a relative path, e.g. dynamo/indexer); the
    version from `dist`'s dist-info (a wheel name such as ai_dynamo_runtime). PeerMissing naming
    `what` and the fix when none does."""
    candidates = [venv] if venv is not None else [Path(PEERS_VENV), _checkout() / PEERS_VENV]
    for root in candidates:
        python = root / "bin" / "python"
        if not python.exists():
            continue
        for site in sorted(root.glob("lib/python*/site-packages")):
            if not (site / module).exists():
                continue
            infos = sorted(site.glob(f"{dist}-*.dist-info"))
            version = infos[-1].name.removesuffix(".dist-info").split("-")[1] if infos else "?"
            return InstalledPeer(python=python.absolute(), site=site.absolute(), version=version)
    where = " or ".join(str(c) for c in candidates)
    raise PeerMissing(f"{what} is not installed in {where}; run `make bench-peers` to install it")
