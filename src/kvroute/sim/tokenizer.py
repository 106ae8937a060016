"""A deterministic toy tokenizer and chat template shared by every simulated engine of a model:
same text → same ids in every engine and every process."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

__all__ = ["BOS_ID", "EOS_ID", "SimTokenizer"]

BOS_ID: Final = 1
EOS_ID: Final = 2
_FIRST_ID: Final = 100  # ids below this are reserved for special tokens

# A piece is a chat role marker such as "<|user|>", a run of word characters, or one
# other non-space character; whitespace only separates pieces.
_PIECE = re.compile(r"<\|[A-Za-z_]+\|>|\w+|[^\w\s]")

_SYLLABLES: Final = (
    "ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "be", "da", "fu", "go", "hi", "jo", "pe", "zu",
)  # fmt: skip


def _word_list(n: int) -> list[str]:
    """`n` distinct pronounceable words: the vocabulary of generated text and synthetic prompts."""
    words = []
    s = len(_SYLLABLES)
    for i in range(n):
        a, b, c = i % s, (i // s) % s, (i // (s * s)) % s
        words.append(_SYLLABLES[a] + _SYLLABLES[b] + _SYLLABLES[c])
    return words


class SimTokenizer:
    """Whitespace/punctuation pieces; id = stable hash of the piece into the vocabulary.

    `encode(text, add_special_tokens=True)` prepends BOS like vLLM's completion form.
    `decode` knows every piece it has encoded plus the generation vocabulary; unknown ids
    decode as ``<id:N>``.
    """

    def __init__(self, vocab_size: int = 32_000, *, generation_words: int = 1024) -> None:
        if vocab_size <= _FIRST_ID + 16:
            raise ValueError(f"vocab_size: expected > {_FIRST_ID + 16}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_id = BOS_ID
        self.eos_id = EOS_ID
        self._ids: dict[str, int] = {}
        self._pieces: dict[int, str] = {BOS_ID: "<s>", EOS_ID: "</s>"}
        self.words = _word_list(generation_words)
        self.word_ids = [self.piece_id(w) for w in self.words]

    # -- pieces and ids ------------------------------------------------------------------------
    def piece_id(self, piece: str) -> int:
        """The id of one piece (stable across processes: blake2b, not Python's hash)."""
        known = self._ids.get(piece)
        if known is not None:
            return known
        digest = hashlib.blake2b(piece.encode(), digest_size=8).digest()
        tid = _FIRST_ID + int.from_bytes(digest, "big") % (self.vocab_size - _FIRST_ID)
        if len(self._ids) < 1_000_000:  # bounded reverse map for decode
            self._ids[piece] = tid
            self._pieces.setdefault(tid, piece)
        return tid

    def pieces(self, text: str) -> list[str]:
        return _PIECE.findall(text)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = [self.piece_id(p) for p in _PIECE.findall(text)]
        return [BOS_ID, *ids] if add_special_tokens else ids

    def token_str(self, tid: int) -> str:
        return self._pieces.get(tid, f"<id:{tid}>")

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        out = []
        for tid in ids:
            if skip_special_tokens and tid in (BOS_ID, EOS_ID):
                continue
            out.append(self.token_str(tid))
        return " ".join(out)

    # -- chat ----------------------------------------------------------------------------------
    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """The chat template: ``<s>`` then ``<|role|> content`` per message, then
        ``<|assistant|>`` when a generation prompt is wanted."""
        parts = ["<s>"]
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise ValueError(f"messages[{i}]: expected object, got {type(message).__name__}")
            role = message.get("role")
            if not isinstance(role, str) or not re.fullmatch(r"[A-Za-z_]+", role):
                raise ValueError(f"messages[{i}].role: expected a word, got {role!r}")
            parts.append(f"<|{role}|> {_content_text(i, message.get('content'))}")
        if add_generation_prompt:
            parts.append("<|assistant|>")
        return "\n".join(parts)

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        # "<s>" is the template's BOS: special, one token.
        return [BOS_ID, *self.encode(text[len("<s>") :], add_special_tokens=False)]

    # -- workload helpers ----------------------------------------------------------------------
    def make_text(self, n_tokens: int, seed: int | str = 0) -> str:
        """Text of exactly `n_tokens` tokens (without BOS), deterministic in `seed`."""
        out: list[str] = []
        state = hashlib.blake2b(str(seed).encode(), digest_size=32).digest()
        while len(out) < n_tokens:
            state = hashlib.blake2b(state, digest_size=32).digest()
            for j in range(0, 32, 2):
                if len(out) == n_tokens:
                    break
                out.append(self.words[int.from_bytes(state[j : j + 2], "big") % len(self.words)])
        return " ".join(out)

    def generate(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        """`n` deterministic output ids for a prompt (the simulated model's "answer")."""
        digest = hashlib.blake2b(
            b"".join(t.to_bytes(8, "big", signed=True) for t in prompt_ids), digest_size=32
        ).digest()
        out: list[int] = []
        while len(out) < n:
            digest = hashlib.blake2b(digest, digest_size=32).digest()
            for j in range(0, 32, 2):
                if len(out) == n:
                    break
                word = int.from_bytes(digest[j : j + 2], "big") % len(self.word_ids)
                out.append(self.word_ids[word])
        return out


def _content_text(i: int, content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                text = part.get("text")
                if isinstance(text, str):
                    texts.append(text)
                    continue
            raise ValueError(f"messages[{i}].content: only text parts are supported")
        return " ".join(texts)
    raise ValueError(
        f"messages[{i}].content: expected string or list, got {type(content).__name__}"
    )
