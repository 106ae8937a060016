"""Local tokenization: a Hugging Face `tokenizer.json` plus an optional jinja2 chat template."""

# tokenizers and jinja2 come with the `local-tokenizer` extra and are imported when a
# `LocalTokenizer` is built, not with this module: the gateway imports it whether or not a local
# tokenizer is configured, and `pip install kvroute` alone must still run `kvroute serve`.

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from kvroute.errors import ConfigError, TokenizeError
from kvroute.tokenize.ids import require_token_ids
from kvroute.tokenize.pieces import PieceEncoder
from kvroute.tokenize.timing import Observe, observe_since

if TYPE_CHECKING:
    import jinja2

__all__ = ["LocalTokenizer"]

_EXTRA_HINT = "pip install 'kvroute[local-tokenizer]'"


def _raise_exception(message: str) -> NoReturn:
    # Hugging Face chat templates call raise_exception() to reject a conversation.
    raise TokenizeError(f"chat template rejected the messages: {message}")


def _special_token(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _config_template(config: dict[str, Any]) -> str | None:
    value = config.get("chat_template")
    if isinstance(value, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


class LocalTokenizer:
    """Tokenizes in-process with the same files the engine loads; one tokenizer for every model.

    `chat_template` is a jinja2 template string or the path of a file holding one; when it is
    None, `chat_template` of a `tokenizer_config.json` beside `tokenizer_json` is used, if any.
    bos/eos tokens come from that config unless given. Prompts get the tokenizer's special
    tokens; chat renders the template (which adds them) and encodes without adding more, as
    vLLM's chat form does. Each tokenization is reported to `observe` as mode `local`.

    With `piece_cache_bytes` > 0 and a tokenizer where it is exact (decided once, here;
    `encoding_mode` says which and why), a text is encoded as pieces whose ids are cached
    (tokenize/pieces.py): a shared system prompt or earlier turn then costs a lookup.
    """

    def __init__(
        self,
        tokenizer_json: Path,
        chat_template: str | Path | None = None,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        observe: Observe | None = None,
        piece_cache_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        try:
            import jinja2.sandbox
            from tokenizers import Tokenizer as HfTokenizer
        except ImportError as exc:
            raise ConfigError(
                f"tokenizer_path: a local tokenizer needs the local-tokenizer extra: "
                f"{_EXTRA_HINT} ({exc})"
            ) from exc
        tokenizer_json = Path(tokenizer_json)
        try:
            self._tokenizer = HfTokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise ConfigError(
                f"{tokenizer_json}: expected a Hugging Face tokenizer.json, got {exc}"
            ) from exc
        config = self._read_config(tokenizer_json.parent / "tokenizer_config.json")
        self.bos_token = bos_token if bos_token is not None else _special_token(config, "bos_token")
        self.eos_token = eos_token if eos_token is not None else _special_token(config, "eos_token")
        source = self._template_source(chat_template)
        if source is None:
            source = _config_template(config)
        self._template: jinja2.Template | None = None
        if source is not None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = _raise_exception
            try:
                self._template = env.from_string(source)
            except jinja2.TemplateError as exc:
                raise ConfigError(f"chat_template: expected a jinja2 template, got {exc}") from exc
        self._observe = observe
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets kvroute never
        # reads: a third less time per prompt (docs/design.md, "The router's own latency").
        self._encode_fast = getattr(self._tokenizer, "encode_batch_fast", None)
        self._pieces: PieceEncoder | None = None
        # How texts are encoded, decided once (logged by the gateway at start-up).
        self.encoding_mode = "whole texts: piece_cache_bytes is 0"
        if piece_cache_bytes > 0 and self._encode_fast is not None:
            self._pieces, how = PieceEncoder.build(self._tokenizer, max_bytes=piece_cache_bytes)
            self.encoding_mode = f"{'whole texts:' if self._pieces is None else 'pieces at'} {how}"
        elif piece_cache_bytes > 0:
            self.encoding_mode = "whole texts: tokenizers older than 0.21 (no encode_batch_fast)"

    @property
    def piece_cache(self) -> PieceEncoder | None:
        """The piece cache, when pieces are used (its hits, misses and size)."""
        return self._pieces

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    @staticmethod
    def _read_config(path: Path) -> dict[str, Any]:
        if not path.is_file():
            return {}
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: expected a JSON object, got {exc}") from exc
        return config if isinstance(config, dict) else {}

    @staticmethod
    def _template_source(chat_template: str | Path | None) -> str | None:
        if chat_template is None:
            return None
        if isinstance(chat_template, str) and ("{{" in chat_template or "{%" in chat_template):
            return chat_template
        path = Path(chat_template)
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"chat_template: expected a jinja2 template or a readable file, got {path}: {exc}"
            ) from exc

    async def tokenize_prompt(self, model: str, prompt: str | list[int]) -> list[int]:
        return self.encode_prompt(prompt)

    async def tokenize_chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        if self._template is None:
            raise TokenizeError(f"tokenize chat for {model!r}: no chat template configured")
        return self.encode_chat(
            messages,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=chat_template_kwargs,
        )

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """`tokenize_prompt` without the coroutine: the prompt workers call it
        (gateway/prompt_worker.py)."""
        if not isinstance(prompt, str):
            return list(require_token_ids(prompt, "prompt"))
        started = time.perf_counter()
        ids = self._encode(prompt, add_special_tokens=True)
        observe_since(self._observe, "local", started)
        return ids

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """`tokenize_chat` without the coroutine (see `encode_prompt`)."""
        if self._template is None:
            raise TokenizeError("tokenize chat: no chat template configured")
        started = time.perf_counter()
        context: dict[str, Any] = dict(chat_template_kwargs or {})
        context.update(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
        try:
            text = self._template.render(**context)
        except TokenizeError:
            raise
        except Exception as exc:  # a template may fail in any way on odd messages
            raise TokenizeError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
        ids = self._encode(text, add_special_tokens=False)
        observe_since(self._observe, "local", started)
        return ids

    def _encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        try:
            if self._pieces is not None:
                pieces = self._pieces.encode(text, add_special_tokens=add_special_tokens)
                if pieces is not None:
                    return pieces
            if self._encode_fast is not None:
                [encoding] = self._encode_fast([text], add_special_tokens=add_special_tokens)
            else:
                encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
            ids: list[int] = encoding.ids  # a new list each time: no copy of our own
            return ids
        except Exception as exc:
            raise TokenizeError(f"tokenizer failed: {exc}") from exc
