"""Parse the JSON body of an OpenAI completion or chat request into what routing needs.
The raw bytes are kept and forwarded unchanged; only the routing inputs are read from them."""

from __future__ import annotations

import asyncio
import enum
import json
import re
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from starlette.requests import ClientDisconnect, Request

from kvroute.errors import ClientGone, GatewayHTTPError

__all__ = [
    "DEFAULT_MAX_JSON_DEPTH",
    "DEFAULT_MAX_TOKENS",
    "PASSTHROUGH_PATHS",
    "RequestKind",
    "RoutingRequest",
    "check_prompt_length",
    "parse_passthrough",
    "parse_request",
    "read_body",
]

# The engines' other JSON endpoints (vLLM's OpenAI server), passed through to an engine of the
# body's model: by prefix when the body carries a prompt, by load otherwise.
PASSTHROUGH_PATHS: Final = (
    "/v1/embeddings",
    "/v1/responses",
    "/tokenize",
    "/detokenize",
    "/pooling",
    "/classify",
    "/score",
    "/v1/score",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
)

# Outstanding-token estimate when a request sets no max_tokens (OpenAI's completion default is
# 16; chat has none, so assume a typical answer length).
DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}
_MAX_BODY_BYTES = 32 * 1024 * 1024
# OpenAI bodies nest a few levels (messages, content parts, tool schemas); far below the
# interpreter's recursion limit, which a deeper body would otherwise reach.
DEFAULT_MAX_JSON_DEPTH = 128
_JSON = msgspec.json.Decoder()
# Above any engine's context; a larger value would overflow the float load cost of every
# request routed while it is in flight. Pinned by `test_huge_max_tokens_is_a_400`.
_MAX_TOKENS_LIMIT = (1 << 31) - 1
_TOKEN_ID_LIMIT = 1 << 32  # the index packs token ids as 4-byte unsigned ints
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800-\udfff: paired or lone
_STRING_OR_BRACKET = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class RequestKind(enum.StrEnum):
    COMPLETION = "completion"
    CHAT = "chat"

    @property
    def path(self) -> str:
        return "/v1/completions" if self is RequestKind.COMPLETION else "/v1/chat/completions"


@dataclass(frozen=True)
class RoutingRequest:
    """The parts of a request routing looks at, plus the body to forward verbatim."""

    kind: RequestKind
    model: str
    raw: bytes
    prompt: str | list[int] | None = None  # completion: text or token ids
    messages: list[dict[str, Any]] | None = None  # chat
    max_tokens: int = 16
    stream: bool = False
    cache_salt: str | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = field(default=None)
    path: str = ""  # the engine path when not the kind's own (a passed-through endpoint)

    @property
    def upstream_path(self) -> str:
        return self.path or self.kind.path

    def estimated_prompt_tokens(self) -> int:
        """A rough size (4 characters a token) used only when tokenization is skipped or fails."""
        if isinstance(self.prompt, list):
            return len(self.prompt)
        if isinstance(self.prompt, str):
            return len(self.prompt) // 4
        total = 0
        for message in self.messages or ():
            content = message.get("content")
            if isinstance(content, str):
                total += len(content) // 4
        return total


async def read_body(
    request: Request, limit: int = _MAX_BODY_BYTES, timeout_s: float | None = None
) -> bytes:
    """The request body, refused with 413 as soon as its declared length or the bytes read so
    far pass `limit` (the rest is never read), with 408 when it takes longer than `timeout_s`;
    a client that leaves mid-upload: ClientGone."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise GatewayHTTPError(400, f"Content-Length: expected an integer, got {declared!r}")
        if int(declared) > limit:
            raise GatewayHTTPError(
                413, f"request body: expected at most {limit} bytes, got {int(declared)}"
            )
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise GatewayHTTPError(413, f"request body: expected at most {limit} bytes")
                chunks.append(chunk)
    except ClientDisconnect as exc:
        raise ClientGone() from exc
    except TimeoutError as exc:
        raise GatewayHTTPError(
            408,
            f"request body: expected it within {timeout_s:g} s, got {size} bytes",
            code="request_timeout",
        ) from exc
    return b"".join(chunks)


def parse_request(
    kind: RequestKind | None,
    raw: bytes,
    max_body_bytes: int = _MAX_BODY_BYTES,
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH,
    max_prompt_tokens: int = 0,
) -> RoutingRequest:
    """Validate a body; a GatewayHTTPError(400) says which field is wrong and what arrived.
    `kind` None (`/v1/route`): a chat request when the body has `messages`. A prompt of more
    than `max_prompt_tokens` token ids (0: no limit) is refused before its ids are checked."""
    if len(raw) > max_body_bytes:
        raise GatewayHTTPError(413, f"request body: expected at most {max_body_bytes} bytes")
    body = _decode(raw, max_json_depth)
    if not isinstance(body, dict):
        raise GatewayHTTPError(400, f"request body: expected a JSON object, got {_type_name(body)}")
    if kind is None:
        kind = RequestKind.CHAT if "messages" in body else RequestKind.COMPLETION
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayHTTPError(
            400, f"model: expected a non-empty string, got {_type_name(model)}", param="model"
        )
    max_tokens = _max_tokens(kind, body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise GatewayHTTPError(
            400, f"stream: expected a boolean, got {_type_name(stream)}", param="stream"
        )
    cache_salt = body.get("cache_salt")
    if cache_salt is not None and not isinstance(cache_salt, str):
        raise GatewayHTTPError(
            400, f"cache_salt: expected a string, got {_type_name(cache_salt)}", param="cache_salt"
        )
    if kind is RequestKind.COMPLETION:
        return RoutingRequest(
            kind=kind,
            model=model,
            raw=raw,
            prompt=_prompt(body.get("prompt"), max_prompt_tokens),
            max_tokens=max_tokens,
            stream=bool(stream),
            cache_salt=cache_salt,
        )
    messages = body.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) for m in messages)
    ):
        raise GatewayHTTPError(
            400,
            f"messages: expected a non-empty array of objects, got {_type_name(messages)}",
            param="messages",
        )
    add_generation_prompt = body.get("add_generation_prompt", True)
    kwargs = body.get("chat_template_kwargs")
    return RoutingRequest(
        kind=kind,
        model=model,
        raw=raw,
        messages=messages,
        max_tokens=max_tokens,
        stream=bool(stream),
        cache_salt=cache_salt,
        add_generation_prompt=add_generation_prompt
        if isinstance(add_generation_prompt, bool)
        else True,
        chat_template_kwargs=kwargs if isinstance(kwargs, dict) else None,
    )


class _ModelOnly(msgspec.Struct):
    model: str | None = None


def parse_passthrough(
    path: str,
    raw: bytes,
    *,
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH,
    max_prompt_tokens: int = 0,
    whole: bool = True,
) -> RoutingRequest:
    """A body for one of `PASSTHROUGH_PATHS`: its model (400 when missing: kvroute must know
    whose engines may take it) and the prompt routing can match, when it has one: `input` of
    embeddings and responses (text or ids; responses' `instructions` as a system message),
    `prompt` or `messages` of tokenize. `whole` False (a large body): only `model` is read,
    without building the rest, and the request is routed by load."""
    if not whole:
        try:
            model = msgspec.json.decode(raw, type=_ModelOnly).model
        except msgspec.DecodeError:
            model = _passthrough_model(_decode(raw, max_json_depth))
        return RoutingRequest(RequestKind.COMPLETION, _require_model(model), raw, path=path)
    body = _decode(raw, max_json_depth)
    model = _require_model(_passthrough_model(body))
    stream = body.get("stream") is True
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    source = body.get("prompt") if path == "/tokenize" else body.get("input")
    if path in ("/v1/embeddings", "/v1/responses", "/tokenize", "/pooling", "/classify"):
        if isinstance(source, str) or (isinstance(source, list) and _token_ids(source)):
            prompt = _prompt(source, max_prompt_tokens)
        elif _is_messages(source):
            messages = source
        elif path == "/tokenize" and _is_messages(body.get("messages")):
            messages = body["messages"]
    instructions = body.get("instructions") if path == "/v1/responses" else None
    if isinstance(instructions, str) and (prompt is None or isinstance(prompt, str)):
        messages = [{"role": "system", "content": instructions}, *(messages or [])]
        if isinstance(prompt, str):
            messages.append({"role": "user", "content": prompt})
        prompt = None
    if messages is not None:
        return RoutingRequest(
            RequestKind.CHAT, model, raw, messages=messages, max_tokens=0, stream=stream, path=path
        )
    return RoutingRequest(
        RequestKind.COMPLETION, model, raw, prompt=prompt, max_tokens=0, stream=stream, path=path
    )


def _passthrough_model(body: Any) -> Any:
    if not isinstance(body, dict):
        raise GatewayHTTPError(400, f"request body: expected a JSON object, got {_type_name(body)}")
    return body.get("model")


def _require_model(model: Any) -> str:
    if not isinstance(model, str) or not model:
        raise GatewayHTTPError(
            400, f"model: expected a non-empty string, got {_type_name(model)}", param="model"
        )
    return model


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value)
    )


def _decode(raw: bytes, max_depth: int) -> Any:
    """The body as Python values (msgspec: several times faster than `json`, so a large body
    holds the loop or a worker for less); 400 for invalid JSON or nesting past `max_depth`."""
    if raw.count(b"[") + raw.count(b"{") > max_depth:
        _check_depth(raw, max_depth)
    try:
        return _JSON.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        pass
    # Strict JSON failed. Python's parser also takes NaN, Infinity and lone surrogate escapes,
    # as the engines' own parser does: such a body is forwarded, unless a field routing reads
    # is wrong (a lone surrogate can be neither tokenized nor encoded, so it is a 400).
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise GatewayHTTPError(
            400, f"request body: expected a JSON object, got invalid JSON ({exc})"
        ) from exc
    if _SURROGATE_ESCAPE.search(raw):
        _check_unicode(body)
    return body


def check_prompt_length(tokens: int, limit: int) -> None:
    """400 `context_length_exceeded` when a prompt has more than `limit` tokens (0: no limit)."""
    if limit and tokens > limit:
        raise GatewayHTTPError(
            400,
            f"prompt: expected at most {limit} tokens, got {tokens}",
            code="context_length_exceeded",
        )


def _check_unicode(body: Any) -> None:
    """A lone surrogate escape (``"\\ud800"``) parses, but no tokenizer or engine can encode it."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise GatewayHTTPError(
            400, f"request body: expected valid Unicode text, got a lone surrogate ({exc.reason})"
        ) from exc


def _check_depth(raw: bytes, max_depth: int) -> None:
    """400 when arrays and objects nest deeper than `max_depth`, brackets inside strings aside.
    Only bodies with more brackets than the limit get here; the regex skips strings whole."""
    depth = 0
    for m in _STRING_OR_BRACKET.finditer(raw):
        token = m.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise GatewayHTTPError(
                    400, f"request body: expected JSON nested at most {max_depth} deep"
                )
        elif token in (b"]", b"}"):
            depth -= 1


def _token_ids(value: list[Any]) -> list[int] | None:
    """`value` as token ids, None if it is not a list of ints; 400 for ids out of range."""
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return None
    for t in value:
        if not 0 <= t < _TOKEN_ID_LIMIT:
            raise GatewayHTTPError(
                400,
                f"prompt: expected token ids in [0, 2**32), got {str(t)[:40]}",
                param="prompt",
            )
    return list(value)


def _prompt(value: Any, max_tokens: int) -> str | list[int]:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        one = value[0] if len(value) == 1 and isinstance(value[0], list) else value
        check_prompt_length(len(one), max_tokens)  # before any work on each id
        # One prompt given as a list: token ids, or a single-element batch of one text.
        if value and (ids := _token_ids(value)) is not None:
            return ids
        if len(value) == 1 and isinstance(value[0], str):
            return str(value[0])
        inner = value[0] if len(value) == 1 else None
        if isinstance(inner, list) and (ids := _token_ids(inner)) is not None:
            return ids
        if value and all(isinstance(p, str) for p in value):
            # A batch of prompts shares one engine; route by the first.
            return str(value[0])
    raise GatewayHTTPError(
        400,
        f"prompt: expected a string, an array of token ids or of strings, got {_type_name(value)}",
        param="prompt",
    )


def _max_tokens(kind: RequestKind, body: dict[str, Any]) -> int:
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not 0 <= value <= _MAX_TOKENS_LIMIT
        ):
            raise GatewayHTTPError(
                400,
                f"{name}: expected an integer in [0, {_MAX_TOKENS_LIMIT}], got {repr(value)[:40]}",
                param=name,
            )
        return value
    return DEFAULT_MAX_TOKENS[kind.value]


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string" if value else "an empty string"
    if isinstance(value, list):
        return "array" if value else "an empty array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
