"""ZeroMQ CURVE keys: read and check key files (zmq.auth's certificate format), write a key pair,
make a socket a CURVE server or client."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import zmq
import zmq.auth
from zmq.utils import z85

from kvroute.errors import ConfigError

__all__ = [
    "CurveClientKeys",
    "CurveKeyPair",
    "check_curve_key",
    "curve_client",
    "curve_server",
    "load_curve_key_pair",
    "load_curve_public_key",
    "write_curve_key_pair",
]

_KEY_CHARS: Final = 40  # Z85 of a 32-byte key


def check_curve_key(value: object, what: str) -> bytes:
    """`value` as a Z85 CURVE key (40 characters, 32 bytes decoded); ConfigError naming `what`."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    if not isinstance(text, str) or len(text.strip()) != _KEY_CHARS or not text.isascii():
        shown = f"{len(text.strip())} characters" if isinstance(text, str) else repr(value)
        raise ConfigError(f"{what}: expected a 40-character Z85 CURVE key, got {shown}")
    key = text.strip().encode("ascii", "replace")
    try:
        decoded = z85.decode(key)
    except (ValueError, KeyError, IndexError, struct.error) as exc:
        raise ConfigError(f"{what}: expected a Z85 CURVE key, got characters outside Z85") from exc
    if len(decoded) != 32:
        raise ConfigError(f"{what}: expected a Z85 CURVE key of 32 bytes, got {len(decoded)}")
    return key


@dataclass(frozen=True)
class CurveKeyPair:
    """One side's CURVE key pair, Z85 (40 bytes each)."""

    public: bytes
    secret: bytes

    def __repr__(self) -> str:  # never print a secret key into a log
        return f"CurveKeyPair(public={self.public.decode()!r}, secret=<hidden>)"


@dataclass(frozen=True)
class CurveClientKeys:
    """What a CURVE client needs: its own pair and the server's public key."""

    pair: CurveKeyPair
    server_key: bytes


def _read(path: Path, what: str) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: cannot read a CURVE key file {str(path)!r} ({exc})") from exc


def load_curve_public_key(path: Path, what: str = "public key file") -> bytes:
    """The public key of a key file (a `*.key` file, or the `*.key_secret` one)."""
    public, _ = _read(Path(path), what)
    return check_curve_key(public, f"{what} {str(path)!r}")


def load_curve_key_pair(
    secret_file: Path, public_file: Path | None = None, what: str = "secret key file"
) -> CurveKeyPair:
    """The pair in `secret_file` (zmq.auth's `*.key_secret`: both keys); `public_file`, when
    given, must hold the same public key. Anything else is a ConfigError."""
    public, secret = _read(Path(secret_file), what)
    where = f"{what} {str(secret_file)!r}"
    if secret is None:
        raise ConfigError(f"{where}: expected a secret key, got a public key file only")
    pair = CurveKeyPair(
        check_curve_key(public, f"{where} public-key"),
        check_curve_key(secret, f"{where} secret-key"),
    )
    if zmq.curve_public(pair.secret) != pair.public:
        raise ConfigError(f"{where}: the public key does not belong to the secret key")
    if public_file is not None and load_curve_public_key(public_file) != pair.public:
        raise ConfigError(
            f"{where}: expected the key pair of {str(public_file)!r}, got another public key"
        )
    return pair


def write_curve_key_pair(out_dir: Path, name: str) -> tuple[Path, Path]:
    """A fresh pair as `out_dir/name.key` (public) and `name.key_secret` (mode 0600); refuses to
    overwrite. Returns (public file, secret file)."""
    out_dir = Path(out_dir)
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"key name: expected a plain file name, got {name!r}")
    public_file, secret_file = out_dir / f"{name}.key", out_dir / f"{name}.key_secret"
    for path in (public_file, secret_file):
        if path.exists():
            raise ConfigError(f"{str(path)!r} exists: not overwritten")
    out_dir.mkdir(parents=True, exist_ok=True)
    # zmq.auth writes both files with the default umask: create the secret one 0600 first.
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        made_public, made_secret = zmq.auth.create_certificates(out_dir, name)
    except OSError:
        secret_file.unlink(missing_ok=True)
        raise
    os.chmod(made_secret, 0o600)
    return Path(made_public), Path(made_secret)


def curve_server(sock: zmq.Socket[Any], pair: CurveKeyPair) -> None:
    """Make `sock` (before bind) a CURVE server holding `pair`."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public)


def curve_client(sock: zmq.Socket[Any], keys: CurveClientKeys) -> None:
    """Make `sock` (before connect) a CURVE client of the server whose public key it holds."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.pair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.pair.secret)
