"""The tokenizer seam: what the gateway calls to turn a request into token ids."""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Tokenizer"]


class Tokenizer(Protocol):
    """Token ids for a request, as the engine would compute them; failures raise TokenizeError.

    `model` may name a base model or a LoRA adapter. A prompt already given as token ids is
    returned unchanged.
    """

    async def tokenize_prompt(self, model: str, prompt: str | list[int]) -> list[int]: ...

    async def tokenize_chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]: ...
