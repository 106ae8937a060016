"""Parsing OpenAI request bodies: what routing reads, and 400s that name the field."""

from __future__ import annotations

import json

import pytest

from kvroute.errors import GatewayHTTPError
from kvroute.gateway.openai_body import DEFAULT_MAX_TOKENS, RequestKind, parse_request
from kvroute.gateway.openai_errors import http_error_response


def _raw(body: object) -> bytes:
    return json.dumps(body).encode()


def test_completion_body_keeps_raw_bytes_and_reads_routing_fields() -> None:
    raw = _raw({"model": "m", "prompt": "hi", "max_tokens": 7, "stream": True, "cache_salt": "s"})
    req = parse_request(RequestKind.COMPLETION, raw)
    assert req.raw == raw
    assert (req.model, req.prompt, req.max_tokens, req.stream, req.cache_salt) == (
        "m",
        "hi",
        7,
        True,
        "s",
    )
    assert req.kind.path == "/v1/completions"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ([1, 2, 3], [1, 2, 3]),
        (["one text"], "one text"),
        ([[4, 5]], [4, 5]),
        (["first", "second"], "first"),
    ],
)
def test_completion_prompt_forms(prompt: object, expected: object) -> None:
    req = parse_request(RequestKind.COMPLETION, _raw({"model": "m", "prompt": prompt}))
    assert req.prompt == expected


def test_chat_body_reads_messages_and_template_options() -> None:
    messages = [{"role": "user", "content": "hello"}]
    req = parse_request(
        RequestKind.CHAT,
        _raw(
            {
                "model": "m",
                "messages": messages,
                "max_completion_tokens": 9,
                "add_generation_prompt": False,
                "chat_template_kwargs": {"enable_thinking": False},
            }
        ),
    )
    assert req.messages == messages
    assert req.max_tokens == 9
    assert req.add_generation_prompt is False
    assert req.chat_template_kwargs == {"enable_thinking": False}
    assert req.kind.path == "/v1/chat/completions"


def test_max_tokens_defaults_per_kind() -> None:
    completion = parse_request(RequestKind.COMPLETION, _raw({"model": "m", "prompt": "x"}))
    chat = parse_request(
        RequestKind.CHAT, _raw({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    )
    assert completion.max_tokens == DEFAULT_MAX_TOKENS["completion"]
    assert chat.max_tokens == DEFAULT_MAX_TOKENS["chat"]


@pytest.mark.parametrize(
    ("kind", "raw", "param", "fragment"),
    [
        (RequestKind.CHAT, b"{oops", None, "invalid JSON"),
        (RequestKind.CHAT, b"\xff", None, "invalid JSON"),
        (RequestKind.CHAT, b"[" * 100_000, None, "nested at most 128 deep"),
        (RequestKind.CHAT, b"42", None, "got number"),
        (RequestKind.CHAT, _raw({"model": 3, "messages": []}), "model", "got number"),
        (RequestKind.CHAT, _raw({"model": "m"}), "messages", "got null"),
        (RequestKind.CHAT, _raw({"model": "m", "messages": []}), "messages", "empty array"),
        (RequestKind.CHAT, _raw({"model": "m", "messages": ["x"]}), "messages", "array"),
        (RequestKind.COMPLETION, _raw({"model": "m"}), "prompt", "got null"),
        (RequestKind.COMPLETION, _raw({"model": "m", "prompt": [1, "a"]}), "prompt", "array"),
        (RequestKind.COMPLETION, _raw({"model": "", "prompt": "x"}), "model", "empty string"),
        (
            RequestKind.COMPLETION,
            _raw({"model": "m", "prompt": "x", "max_tokens": True}),
            "max_tokens",
            "True",
        ),
        (
            RequestKind.COMPLETION,
            _raw({"model": "m", "prompt": "x", "stream": "yes"}),
            "stream",
            "got string",
        ),
        (
            RequestKind.COMPLETION,
            _raw({"model": "m", "prompt": "x", "cache_salt": 1}),
            "cache_salt",
            "got number",
        ),
    ],
)
def test_bad_bodies_raise_400_naming_the_field(
    kind: RequestKind, raw: bytes, param: str | None, fragment: str
) -> None:
    with pytest.raises(GatewayHTTPError) as info:
        parse_request(kind, raw)
    assert info.value.status == 400
    assert info.value.param == param
    assert fragment in info.value.message


def test_error_response_has_the_openai_shape() -> None:
    err = GatewayHTTPError(404, "model: unknown", param="model", code="model_not_found")
    response = http_error_response(err)
    assert response.status_code == 404
    assert json.loads(bytes(response.body)) == {
        "error": {
            "message": "model: unknown",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


@pytest.mark.parametrize("value", [2**31, 10**4000, -1])
def test_huge_max_tokens_is_a_400(value: int) -> None:
    # A huge budget would overflow the float load cost of every request routed meanwhile.
    for name in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(GatewayHTTPError) as info:
            parse_request(RequestKind.COMPLETION, _raw({"model": "m", "prompt": "x", name: value}))
        assert (info.value.status, info.value.param) == (400, name)
    ok = parse_request(
        RequestKind.COMPLETION, _raw({"model": "m", "prompt": "x", "max_tokens": 2**31 - 1})
    )
    assert ok.max_tokens == 2**31 - 1


@pytest.mark.parametrize("prompt", [[2**32], [-1, 5], [[0, 2**40]], [1, 2, 10**30]])
def test_token_ids_outside_uint32_are_a_400(prompt: object) -> None:
    with pytest.raises(GatewayHTTPError) as info:
        parse_request(RequestKind.COMPLETION, _raw({"model": "m", "prompt": prompt}))
    assert (info.value.status, info.value.param) == (400, "prompt")
    assert "2**32" in info.value.message


def test_token_ids_at_the_uint32_bounds_are_kept() -> None:
    req = parse_request(RequestKind.COMPLETION, _raw({"model": "m", "prompt": [0, 2**32 - 1]}))
    assert req.prompt == [0, 2**32 - 1]


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        (RequestKind.COMPLETION, {"model": "m", "prompt": "\ud800"}),
        (RequestKind.CHAT, {"model": "m", "messages": [{"role": "user", "content": "a\udfffb"}]}),
        (RequestKind.COMPLETION, {"model": "m", "prompt": "x", "user": "\udbff"}),
    ],
)
def test_lone_surrogate_escapes_are_a_400(kind: RequestKind, body: dict[str, object]) -> None:
    with pytest.raises(GatewayHTTPError) as info:
        parse_request(kind, _raw(body))
    assert info.value.status == 400 and "surrogate" in info.value.message


def test_escaped_surrogate_pairs_are_valid_text() -> None:
    req = parse_request(RequestKind.COMPLETION, _raw({"model": "m", "prompt": "smile \U0001f600"}))
    assert req.prompt == "smile \U0001f600"


def test_upper_case_surrogate_escapes_are_found_too() -> None:
    with pytest.raises(GatewayHTTPError) as info:
        parse_request(RequestKind.COMPLETION, b'{"model": "m", "prompt": "\\uDBFF"}')
    assert "surrogate" in info.value.message
    pair = parse_request(RequestKind.COMPLETION, b'{"model": "m", "prompt": "\\uD83D\\uDE00"}')
    assert pair.prompt == "\U0001f600"


def test_json_depth_limit_is_exact_and_a_400() -> None:
    # {"messages": [{"extra": [[...]]}]}: object, array, object, then the arrays.
    ok = b'{"model": "m", "messages": [{"role": "user", "content": "x", "x": ' + b"[" * 125
    ok += b"]" * 125 + b"}]}"
    parse_request(RequestKind.CHAT, ok, max_json_depth=128)
    deeper = ok.replace(b"[" * 125, b"[" * 126).replace(b"]" * 125, b"]" * 126)
    with pytest.raises(GatewayHTTPError) as info:
        parse_request(RequestKind.CHAT, deeper, max_json_depth=128)
    assert info.value.status == 400 and "nested at most 128 deep" in info.value.message


def test_brackets_inside_strings_do_not_count_towards_depth() -> None:
    text = '[[{"\\"]' * 200 + '\\"'  # brackets, quotes and escapes, all inside one string
    raw = json.dumps({"model": "m", "prompt": text}).encode()
    assert raw.count(b"[") > 128
    assert parse_request(RequestKind.COMPLETION, raw, max_json_depth=2).prompt == text


@pytest.mark.parametrize("prompt", [[-1] * 1001, [[7] * 1001]], ids=["ids", "nested"])
def test_a_prompt_over_the_token_limit_is_refused_before_its_ids_are_read(prompt: object) -> None:
    raw = json.dumps({"model": "m", "prompt": prompt}).encode()
    with pytest.raises(GatewayHTTPError) as info:
        parse_request(RequestKind.COMPLETION, raw, max_prompt_tokens=1000)
    assert info.value.code == "context_length_exceeded"
    assert "at most 1000 tokens, got 1001" in info.value.message
    assert parse_request(RequestKind.COMPLETION, b'{"model": "m", "prompt": [1]}').prompt == [1]
