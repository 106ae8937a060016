"""The gateways a relay lets in: a directory of public key files (zmq.auth `*.key` format),
reloaded when it changes; answers the ZAP handler's CURVE question."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Final

from kvroute.errors import ConfigError
from kvroute.events.curve import load_curve_public_key
from kvroute.relay.counters import RelayCounters

__all__ = ["AllowList"]

log = logging.getLogger("kvroute.relay")

_MAX_LOGGED_DENIALS: Final = 1024  # distinct keys whose refusal is logged (then: counted only)


class AllowList:
    """Public keys read from `directory/*.key`. `reload_if_changed()` rereads them when a file
    was added, removed or changed (a Kubernetes secret update swaps them all at once); a file
    that is not a key file is skipped with a warning, the rest still count. A directory that
    cannot be read keeps the previous keys."""

    def __init__(self, directory: Path, counters: RelayCounters) -> None:
        self.directory = Path(directory)
        self._counters = counters
        self._keys: frozenset[bytes] = frozenset()
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._logged: set[bytes] = set()
        if not self.directory.is_dir():
            raise ConfigError(
                f"allow-list: expected a directory of gateway public key files, got "
                f"{str(self.directory)!r}"
            )
        self.reload_if_changed()

    @property
    def keys(self) -> frozenset[bytes]:
        return self._keys

    def _scan(self) -> tuple[tuple[str, int, int], ...]:
        entries = []
        for path in sorted(self.directory.glob("*.key")):
            st = os.stat(path)  # follows symlinks (a mounted secret's files are symlinks)
            entries.append((path.name, st.st_mtime_ns, st.st_size))
        return tuple(entries)

    def reload_if_changed(self) -> bool:
        """Reread the keys if the directory changed; True when it did."""
        try:
            signature = self._scan()
        except OSError as exc:
            self._counters.allow_list_reloads["error"] += 1
            log.warning("relay allow-list %s unreadable, keeping %d keys: %s", self.directory,
                        len(self._keys), exc)  # fmt: skip
            return False
        if signature == self._signature:
            return False
        self._signature = signature
        keys: set[bytes] = set()
        bad = 0
        for name, _, _ in signature:
            try:
                keys.add(load_curve_public_key(self.directory / name, "allow-list key file"))
            except ConfigError as exc:
                bad += 1
                log.warning("relay allow-list: file skipped: %s", exc)
        self._keys = frozenset(keys)
        self._counters.allow_list_keys = len(keys)
        self._counters.allow_list_reloads["error" if bad else "ok"] += 1
        log.info(
            "relay allow-list loaded",
            extra={"directory": str(self.directory), "keys": len(keys), "skipped": bad},
        )
        return True

    def callback(self, domain: str, key: bytes) -> bool:
        """zmq.auth's CURVE credentials provider: is this client's (Z85) public key allowed?"""
        allowed = key in self._keys
        if not allowed and key not in self._logged and len(self._logged) < _MAX_LOGGED_DENIALS:
            self._logged.add(key)
            log.warning(
                "relay: client key not in the allow-list, refused",
                extra={"client_key": key.decode("ascii", "replace"), "domain": domain},
            )
        return allowed
