"""The one exception tree of kvroute; every error kvroute raises on purpose is one of these.

KvrouteError                  base; never raised itself
├── WireError                 a payload or frame is not a vLLM KV-event batch we can read
├── IndexStateError           an index operation would corrupt or cannot use the index state
├── TokenizeError             a request could not be turned into token ids
├── EngineError               an engine is unreachable, timed out or answered unusably
│   ├── EngineConnectError    no connection: the engine cannot have seen the request
│   └── EngineResponseError   sent (or maybe sent), then failed, timed out or broke off
├── ConfigError               settings or the fleet file are invalid
├── GatewayHTTPError          a request is answered with an OpenAI-shaped 4xx/5xx error
└── ClientGone                the client hung up before the engine answered

Not in the tree, on purpose:
- ValueError, TypeError or RuntimeError for a broken precondition of a call: a bug in the
  caller, never a condition of a running service (`Policy.choose` without a healthy candidate,
  a publisher used before `start()`). Pydantic validators in `settings.py` must raise
  ValueError; `load_settings` turns those into ConfigError.
- `kvroute.sim` and `kvroute.bench` raise builtins for bad arguments: they drive kvroute from
  outside and are not part of the service.
"""

from __future__ import annotations

__all__ = [
    "ClientGone",
    "ConfigError",
    "EngineConnectError",
    "EngineError",
    "EngineResponseError",
    "GatewayHTTPError",
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
    """Raised by `tokenize` when neither the remote nor the local tokenizer produced ids, and by
    an engine client's `tokenize_*` for a request that cannot be encoded (nothing was sent)."""


class EngineError(KvrouteError):
    """An engine's HTTP API failed us: raised by the engine client (`kvroute.upstream`), the
    scrape parser (`fleet/scrape.py`) and the simulator. Catch a subclass to tell whether a
    retry on another engine is safe."""


class EngineConnectError(EngineError):
    """Could not connect (refused, unreachable, connect timeout); the engine cannot have seen the
    request: safe to retry elsewhere. Raised by the engine client."""


class EngineResponseError(EngineError):
    """The request may have reached the engine: it failed while sending or waiting, timed out,
    broke off while the answer was read, or the answer is unusable (a status or body kvroute
    cannot use). Not safe to retry elsewhere. Raised by the engine client."""


class ConfigError(KvrouteError):
    """Raised for invalid settings or fleet files; the message names file, engine and field."""


class GatewayHTTPError(KvrouteError):
    """Raised inside a gateway handler to answer with an OpenAI-shaped error (`status`, and the
    `error` object's message, type, param and code); never leaves the gateway."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code


class ClientGone(KvrouteError):
    """Raised by the gateway's proxy when the client disconnected before the engine answered;
    the upstream call was cancelled and the handler answers 499 to nobody."""
