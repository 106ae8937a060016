"""Remote tokenization through an engine's own `/tokenize` so its chat template applies
(pinned by test_chat_uses_chat_form_so_the_engine_template_applies)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kvroute.core import EngineClient
from kvroute.errors import EngineError, TokenizeError
from kvroute.tokenize.ids import require_token_ids
from kvroute.tokenize.timing import Observe, observe_since

__all__ = ["RemoteTokenizer"]


class RemoteTokenizer:
    """Asks an engine serving the model for its token ids; `url_for_model` picks the engine
    (the gateway passes `Fleet.url_for_model`), `client` makes the call.

    Completion form for prompts, chat form for messages (the engine renders its chat template
    exactly as `/v1/chat/completions` does). Each call ends within `timeout_s`. Timeouts,
    connect failures, error statuses and malformed answers all raise TokenizeError. Each
    successful call is reported to `observe` as mode `remote`.
    """

    def __init__(
        self,
        client: EngineClient,
        url_for_model: Callable[[str], str | None],
        *,
        timeout_s: float,
        observe: Observe | None = None,
    ) -> None:
        self._client = client
        self._url_for_model = url_for_model
        self._timeout_s = timeout_s
        self._observe = observe

    def _url(self, model: str) -> str:
        base = self._url_for_model(model)
        if base is None:
            raise TokenizeError(f"tokenize {model!r}: no engine serves this model")
        return base

    async def tokenize_prompt(self, model: str, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return list(require_token_ids(prompt, "prompt"))
        base = self._url(model)
        started = time.perf_counter()
        try:
            ids = await self._client.tokenize_prompt(
                base, model, prompt, add_special_tokens=True, timeout_s=self._timeout_s
            )
        except EngineError as exc:
            raise TokenizeError(str(exc)) from exc
        observe_since(self._observe, "remote", started)
        return ids

    async def tokenize_chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        base = self._url(model)
        started = time.perf_counter()
        try:
            ids = await self._client.tokenize_chat(
                base,
                model,
                messages,
                add_generation_prompt=add_generation_prompt,
                chat_template_kwargs=chat_template_kwargs,
                timeout_s=self._timeout_s,
            )
        except EngineError as exc:
            raise TokenizeError(str(exc)) from exc
        observe_since(self._observe, "remote", started)
        return ids
