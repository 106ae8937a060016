"""The one exception tree of kvroute; every error kvroute raises on purpose is one of these.

KvrouteError                 base; never raised itself
├── WireError                a payload or frame is not a vLLM KV-event batch we can read
├── IndexStateError          an index operation would corrupt or cannot use the index state
├── TokenizeError            a request could not be turned into token ids
├── EngineError              an engine is unreachable, timed out or answered with an error
└── ConfigError              settings or the fleet file are invalid
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "EngineError",
    "IndexStateError",
    "KvrouteError",
    "TokenizeError",
    "WireError",
]


class KvrouteError(Exception):
    """Base of every kvroute error."""


class WireError(KvrouteError):
    """Raised by `events.wire` when a payload is malformed: the message says what was expected
    and what arrived, e.g. ``BlockStored.block_size: expected int, got str``."""


class IndexStateError(KvrouteError):
    """Raised by `index` when asked for something its state cannot answer (unknown source,
    block size mismatch on a partition)."""


class TokenizeError(KvrouteError):
    """Raised by `tokenize` when neither the remote nor the local tokenizer produced ids."""


class EngineError(KvrouteError):
    """Raised by the engine HTTP client on connect failures, timeouts and error statuses."""


class ConfigError(KvrouteError):
    """Raised for invalid settings or fleet files; the message names file, engine and field."""
