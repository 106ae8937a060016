"""The engine HTTP seam (`EngineClient`, `EngineResponse`): everything kvroute asks of a vLLM
engine's HTTP API, free of any HTTP library (kvroute.upstream implements it)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

__all__ = ["EngineClient", "EngineResponse"]


class EngineResponse(Protocol):
    """An engine's answer to a proxied request, its body not read yet: status and headers are
    here, the body arrives through `aiter_raw`. Whoever opened it calls `aclose()` exactly once,
    also when it stops reading early.

    `headers` has lower-case names; a header sent several times is one comma-joined value.
    `aiter_raw` yields the body's bytes as received (no content decoding), and raises
    EngineResponseError when the engine breaks off or stops sending for the read timeout.
    """

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class EngineClient(Protocol):
    """What kvroute calls on an engine, addressed by the engine's base URL (`EngineSpec.url`).

    Every call raises EngineConnectError when no connection could be made (the engine cannot
    have seen the request: retrying elsewhere is safe) and EngineResponseError for anything that
    went wrong later. A call given `timeout_s` ends by then as a whole (connect, send and the
    complete answer), as EngineResponseError "timed out after …", unless the connect phase
    alone failed first. `post_stream` has no deadline of its own: the client's connect and read
    timeouts bound each phase and each wait for more bytes.
    """

    async def health(self, base_url: str, *, timeout_s: float) -> int:
        """GET `/health`: the status code (vLLM answers 200 when it can serve)."""
        ...

    async def metrics_text(self, base_url: str, *, timeout_s: float) -> str:
        """GET `/metrics`: the Prometheus text; any status but 200 is an EngineResponseError."""
        ...

    async def tokenize_prompt(
        self, base_url: str, model: str, prompt: str, *, add_special_tokens: bool, timeout_s: float
    ) -> list[int]:
        """POST `/tokenize` in completion form: the engine's token ids of `prompt`.

        A status but 200, or an answer without a `tokens` list of ids in [0, 2**32), is an
        EngineResponseError; a request that cannot be encoded as strict JSON is a TokenizeError
        and nothing is sent.
        """
        ...

    async def tokenize_chat(
        self,
        base_url: str,
        model: str,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool,
        chat_template_kwargs: dict[str, Any] | None,
        timeout_s: float,
    ) -> list[int]:
        """POST `/tokenize` in chat form (the engine applies its chat template, as for
        `/v1/chat/completions`); answers and errors as `tokenize_prompt`."""
        ...

    async def post_stream(
        self, base_url: str, path: str, *, body: bytes, headers: Mapping[str, str]
    ) -> EngineResponse:
        """POST `body` to `path` and return as soon as the status and headers arrived; the body
        is read from the returned response, which the caller must close. Cancelling the call
        abandons the request and frees its connection."""
        ...
