"""LocalTokenizer over a tokenizer.json trained in the test (no downloads) and jinja2 templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from kvroute.errors import ConfigError, TokenizeError
from kvroute.tokenize import LocalTokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a shared system prompt makes prefix caching worth it",
    "you are a helpful assistant answer briefly",
    "user assistant system hello world",
]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    "{% if enable_thinking is defined and enable_thinking %} <think>{% endif %}"
)


def _train(directory: Path) -> Path:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        special_tokens=["[UNK]", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture
def tokenizer_json(tmp_path: Path) -> Path:
    return _train(tmp_path)


def _hf(path: Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


async def test_prompt_ids_match_the_hf_tokenizer_with_special_tokens(tokenizer_json: Path) -> None:
    tok = LocalTokenizer(tokenizer_json)
    ids = await tok.tokenize_prompt("any-model", "the quick brown fox")
    assert ids == _hf(tokenizer_json).encode("the quick brown fox").ids
    assert ids[0] == _hf(tokenizer_json).token_to_id("<s>")
    assert len(ids) == 5


async def test_prompt_given_as_ids_is_returned_as_is(tokenizer_json: Path) -> None:
    assert await LocalTokenizer(tokenizer_json).tokenize_prompt("m", [3, 4]) == [3, 4]


async def test_chat_renders_the_template_then_encodes_without_adding_specials(
    tokenizer_json: Path,
) -> None:
    tok = LocalTokenizer(tokenizer_json, TEMPLATE, bos_token="<s>")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    ids = await tok.tokenize_chat("m", messages)
    rendered = "<s><|system|> be brief <|user|> hello <|assistant|>"
    hf = _hf(tokenizer_json)
    assert ids == hf.encode(rendered, add_special_tokens=False).ids
    assert ids.count(hf.token_to_id("<s>")) == 1  # the template's BOS only


async def test_add_generation_prompt_and_template_kwargs_reach_the_template(
    tokenizer_json: Path,
) -> None:
    tok = LocalTokenizer(tokenizer_json, TEMPLATE, bos_token="<s>")
    messages = [{"role": "user", "content": "hello"}]
    with_prompt = await tok.tokenize_chat("m", messages)
    without = await tok.tokenize_chat("m", messages, add_generation_prompt=False)
    thinking = await tok.tokenize_chat(
        "m", messages, chat_template_kwargs={"enable_thinking": True}
    )
    assert with_prompt[:-1] == without
    assert thinking[: len(with_prompt)] == with_prompt
    assert len(thinking) > len(with_prompt)


async def test_template_from_a_file(tokenizer_json: Path, tmp_path: Path) -> None:
    template_file = tmp_path / "chat.jinja"
    template_file.write_text(TEMPLATE)
    a = LocalTokenizer(tokenizer_json, str(template_file), bos_token="<s>")
    b = LocalTokenizer(tokenizer_json, TEMPLATE, bos_token="<s>")
    messages = [{"role": "user", "content": "hello world"}]
    assert await a.tokenize_chat("m", messages) == await b.tokenize_chat("m", messages)


async def test_template_and_specials_from_tokenizer_config_beside_the_json(
    tokenizer_json: Path,
) -> None:
    config = {"chat_template": TEMPLATE, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    (tokenizer_json.parent / "tokenizer_config.json").write_text(json.dumps(config))
    tok = LocalTokenizer(tokenizer_json)
    assert (tok.bos_token, tok.eos_token, tok.has_chat_template) == ("<s>", "</s>", True)
    ids = await tok.tokenize_chat("m", [{"role": "user", "content": "hello"}])
    assert ids[0] == _hf(tokenizer_json).token_to_id("<s>")


async def test_chat_without_a_template_is_a_tokenize_error(tokenizer_json: Path) -> None:
    with pytest.raises(TokenizeError, match="no chat template"):
        await LocalTokenizer(tokenizer_json).tokenize_chat("m", [{"role": "user", "content": "x"}])


async def test_template_raise_exception_is_a_tokenize_error(tokenizer_json: Path) -> None:
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    )
    tok = LocalTokenizer(tokenizer_json, template)
    with pytest.raises(TokenizeError, match="user first"):
        await tok.tokenize_chat("m", [{"role": "system", "content": "x"}])


async def test_template_errors_on_odd_messages_are_tokenize_errors(tokenizer_json: Path) -> None:
    tok = LocalTokenizer(tokenizer_json, "{{ messages[0]['content'] + 1 }}")
    with pytest.raises(TokenizeError, match="chat template failed"):
        await tok.tokenize_chat("m", [{"role": "user", "content": "x"}])


async def test_template_is_sandboxed(tokenizer_json: Path) -> None:
    tok = LocalTokenizer(tokenizer_json, "{{ messages.__class__.__subclasses__() }}")
    with pytest.raises(TokenizeError, match="SecurityError"):
        await tok.tokenize_chat("m", [{"role": "user", "content": "x"}])


def test_missing_or_bad_tokenizer_json_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.json"):
        LocalTokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json: expected a Hugging Face tokenizer\.json"):
        LocalTokenizer(bad)


def test_bad_template_is_a_config_error(tokenizer_json: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a jinja2 template"):
        LocalTokenizer(tokenizer_json, "{% for %}")
    with pytest.raises(ConfigError, match="readable file"):
        LocalTokenizer(tokenizer_json, str(tmp_path / "missing.jinja"))


async def test_local_latency_is_observed(tokenizer_json: Path) -> None:
    seen: list[tuple[str, float]] = []
    tok = LocalTokenizer(tokenizer_json, TEMPLATE, observe=lambda m, s: seen.append((m, s)))
    await tok.tokenize_prompt("m", "hello")
    await tok.tokenize_chat("m", [{"role": "user", "content": "x"}])
    await tok.tokenize_prompt("m", [1, 2])  # ids: nothing tokenized, nothing timed
    assert [mode for mode, _ in seen] == ["local", "local"]
    assert all(s >= 0 for _, s in seen)
