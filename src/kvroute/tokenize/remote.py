"""Remote tokenization through an engine's own `/tokenize` (reference §7): its template applies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx

from kvroute.errors import TokenizeError
from kvroute.metrics import Metrics
from kvroute.tokenize.ids import require_token_ids
from kvroute.tokenize.timing import observe_since

__all__ = ["RemoteTokenizer"]


class RemoteTokenizer:
    """POSTs to `{url}/tokenize` of an engine serving the model; `url_for_model` picks the engine.

    Completion form for prompts, chat form for messages (the engine renders its chat template
    exactly as `/v1/chat/completions` does). Timeouts, connect failures, error statuses and
    malformed answers all raise TokenizeError.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        url_for_model: Callable[[str], str | None],
        *,
        timeout_s: float = 2.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._client = client
        self._url_for_model = url_for_model
        self._timeout_s = timeout_s
        self._metrics = metrics

    async def tokenize_prompt(self, model: str, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return list(require_token_ids(prompt, "prompt"))
        body = {"model": model, "prompt": prompt, "add_special_tokens": True}
        return await self._post(model, body)

    async def tokenize_chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
        }
        if chat_template_kwargs:
            body["chat_template_kwargs"] = chat_template_kwargs
        return await self._post(model, body)

    async def _post(self, model: str, body: dict[str, Any]) -> list[int]:
        base = self._url_for_model(model)
        if base is None:
            raise TokenizeError(f"tokenize {model!r}: no engine serves this model")
        url = base.rstrip("/") + "/tokenize"
        started = time.perf_counter()
        try:
            # httpx's timeout is per phase; asyncio.timeout bounds the whole round trip.
            async with asyncio.timeout(self._timeout_s):
                response = await self._client.post(url, json=body, timeout=self._timeout_s)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise TokenizeError(f"POST {url}: timed out after {self._timeout_s} s") from exc
        except httpx.HTTPError as exc:
            raise TokenizeError(f"POST {url}: {type(exc).__name__}: {exc}") from exc
        except (TypeError, ValueError) as exc:  # httpx encodes strict JSON: no NaN, no surrogates
            raise TokenizeError(f"POST {url}: request not encodable as JSON: {exc}") from exc
        observe_since(self._metrics, "remote", started)
        if response.status_code != 200:
            raise TokenizeError(
                f"POST {url}: expected status 200, got {response.status_code}: "
                f"{response.text[:200]!r}"
            )
        try:
            answer = response.json()
        except ValueError as exc:
            raise TokenizeError(
                f"POST {url}: expected a JSON body, got {response.text[:80]!r}"
            ) from exc
        if not isinstance(answer, dict) or "tokens" not in answer:
            raise TokenizeError(f"POST {url}: expected an object with 'tokens', got {answer!r:.80}")
        return require_token_ids(answer["tokens"], f"POST {url}: tokens")
