"""The simulator's deterministic tokenizer and chat template."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvroute.sim.tokenizer import BOS_ID, SimTokenizer


def test_same_text_same_ids_in_another_process() -> None:
    text = "Hello, world! The quick brown fox."
    ids = SimTokenizer().encode(text)
    code = f"from kvroute.sim.tokenizer import SimTokenizer;print(SimTokenizer().encode({text!r}))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == str(ids)


def test_completion_form_prepends_bos_and_pieces_split_on_space_and_punctuation() -> None:
    tok = SimTokenizer()
    ids = tok.encode("Hello, world")
    assert ids[0] == BOS_ID and len(ids) == 4  # BOS, Hello, ",", world
    assert tok.encode("Hello, world", add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == "Hello , world"


def test_make_text_has_exactly_the_requested_token_count() -> None:
    tok = SimTokenizer()
    for n in (0, 1, 17, 500):
        text = tok.make_text(n, seed=n)
        assert len(tok.encode(text, add_special_tokens=False)) == n
    assert tok.make_text(50, "a") == tok.make_text(50, "a") != tok.make_text(50, "b")


def test_chat_template_shares_prefix_across_turns() -> None:
    tok = SimTokenizer()
    turn1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ids1 = tok.encode_chat(turn1, add_generation_prompt=False)
    ids2 = tok.encode_chat([*turn1, {"role": "assistant", "content": "hello"}])
    assert ids2[: len(ids1)] == ids1
    assert ids1[0] == BOS_ID
    assert tok.render_chat(turn1) == "<s>\n<|system|> be brief\n<|user|> hi\n<|assistant|>"
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert tok.encode_chat(parts) == tok.encode_chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "messages",
    [[{"content": "x"}], [{"role": "a b", "content": "x"}], [{"role": "user", "content": 3}],
     [{"role": "user", "content": [{"type": "image_url"}]}], ["not a dict"]],
)  # fmt: skip
def test_bad_chat_messages_raise_value_error(messages: list[object]) -> None:
    with pytest.raises(ValueError):
        SimTokenizer().encode_chat(messages)  # type: ignore[arg-type]


def test_generation_is_deterministic_and_decodable() -> None:
    tok = SimTokenizer()
    out = tok.generate([1, 2, 3], 20)
    assert out == SimTokenizer().generate([1, 2, 3], 20) != tok.generate([1, 2, 4], 20)
    assert len(out) == 20 and "<id:" not in tok.decode(out)
