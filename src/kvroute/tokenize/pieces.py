"""Exact ids from cached pieces: a text is cut only where the tokenizer provably encodes each side
alone (at added tokens; after a space when a whitespace pre-tokenizer runs first)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from kvroute.tokenize.caching import IdsLru, estimated_bytes

__all__ = ["PieceEncoder", "piece_plan"]

# Pre-tokenizers that split at every whitespace character and drop it: run first, nothing that
# follows them sees across a space (`WhitespaceSplit`, `Whitespace`'s `\w+|[^\w\s]+`, Bert's).
_SPACE_SPLITTERS = frozenset({"WhitespaceSplit", "Whitespace", "BertPreTokenizer"})
# Normalizers that map each character on its own (so they commute with cutting at a space).
_LOCAL_NORMALIZERS = frozenset({"Lowercase"})
# Chunks of a segment start at the first space at or after every CHUNK_CHARS characters of the
# whole text, so texts with a common start share their first chunks (and their cache entries).
CHUNK_CHARS = 512


def _types(node: Any, key: str) -> Iterator[dict[str, Any]]:
    """`node` and, through Sequences, every component under it (`key`: the Sequence's list)."""
    if not isinstance(node, dict):
        return
    yield node
    for child in node.get(key) or ():
        yield from _types(child, key)


def _normalizer_is_local(normalizer: Any) -> bool:
    if normalizer is None:
        return True
    if normalizer.get("type") == "Sequence":
        return all(_normalizer_is_local(n) for n in normalizer.get("normalizers") or ())
    return normalizer.get("type") in _LOCAL_NORMALIZERS


def _first_pre_tokenizer(pre: Any) -> Any:
    while isinstance(pre, dict) and pre.get("type") == "Sequence" and pre.get("pretokenizers"):
        pre = pre["pretokenizers"][0]
    return pre


def piece_plan(config: dict[str, Any], added: list[Any]) -> tuple[str | None, bool]:
    """From a tokenizer.json `config` and its added tokens (tokenizers' AddedToken objects):
    (why pieces cannot be used, or None; whether segments may also be cut after a space).

    The tokenizers library cuts a text at its added tokens first, then normalizes,
    pre-tokenizes and encodes each part between them on its own; the exceptions, where a part's
    ids depend on more than its text, are what this refuses: tokens that take whitespace or
    words around them (lstrip, rstrip, single_word), tokens matched after normalization (with a
    normalizer), Metaspace's `prepend_scheme: first` (which looks at the part's offset),
    truncation, padding and BPE dropout. Pinned by tests/unit/tokenize/test_pieces.py."""
    if config.get("truncation") is not None or config.get("padding") is not None:
        return "truncation or padding is set", False
    model = config.get("model") or {}
    if model.get("dropout") not in (None, 0, 0.0):
        return "BPE dropout is set", False
    normalizer = config.get("normalizer")
    for token in added:
        if not token.content:
            return "an empty added token", False
        if token.lstrip or token.rstrip or token.single_word:
            return f"added token {token.content!r} has lstrip, rstrip or single_word", False
        if token.normalized and normalizer is not None:
            return f"added token {token.content!r} is matched after normalization", False
    pre = config.get("pre_tokenizer")
    for node in _types(pre, "pretokenizers"):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
            return "Metaspace prepend_scheme first depends on the offset", False
    spaces = (
        _normalizer_is_local(normalizer)
        and isinstance(first := _first_pre_tokenizer(pre), dict)
        and first.get("type") in _SPACE_SPLITTERS
    )
    return None, spaces


def _alternation(contents: list[str]) -> re.Pattern[str] | None:
    """Leftmost-longest matching of literal tokens, as tokenizers' Aho-Corasick: at each
    position Python's alternation takes the first alternative that matches, so longest first."""
    if not contents:
        return None
    ordered = sorted(set(contents), key=len, reverse=True)
    return re.compile("|".join(re.escape(c) for c in ordered))


class PieceEncoder:
    """Encodes a text as the concatenation of its pieces' ids, each piece's ids from an LRU of
    at most `max_bytes` (estimated as the tokenizer cache does) or, for the pieces not there,
    from one `encode_batch_fast` call; with special tokens, between the ids the post-processor
    puts around one sequence (`special`). Built only for a tokenizer `piece_plan` accepts."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        spaces: bool,
        max_bytes: int,
        special: tuple[list[int], list[int]] | None,
        chunk_chars: int = CHUNK_CHARS,
    ) -> None:
        self._tokenizer = tokenizer
        self._chunk = chunk_chars
        self._spaces = spaces
        self._special = special
        added = tokenizer.get_added_tokens_decoder()
        self._ids = {t.content: i for i, t in added.items()}
        # Tokens matched on the raw text first, then those matched after normalization (equal
        # to the raw text here: piece_plan refuses them with a normalizer) in what is left.
        self._raw = _alternation([t.content for t in added.values() if not t.normalized])
        self._normalized = _alternation([t.content for t in added.values() if t.normalized])
        self._entries = IdsLru[str](_piece_bytes, max_bytes=max_bytes)
        self.hits = 0
        self.misses = 0

    @classmethod
    def build(
        cls, tokenizer: Any, *, max_bytes: int, chunk_chars: int = CHUNK_CHARS
    ) -> tuple[PieceEncoder | None, str]:
        """A PieceEncoder for `tokenizer` (a tokenizers.Tokenizer) and how it cuts texts, or None
        and why not."""
        try:
            config = json.loads(tokenizer.to_str())
        except (ValueError, TypeError) as exc:  # pragma: no cover - the library wrote it
            return None, f"tokenizer.json unreadable: {exc}"
        if getattr(tokenizer, "encode_special_tokens", False):
            return None, "encode_special_tokens is set"
        added = list(tokenizer.get_added_tokens_decoder().values())
        refused, spaces = piece_plan(config, added)
        if refused is not None:
            return None, refused
        special = _special_ids(tokenizer)
        how = "added tokens and spaces" if spaces else "added tokens"
        encoder = cls(
            tokenizer, spaces=spaces, max_bytes=max_bytes, special=special, chunk_chars=chunk_chars
        )
        return encoder, how

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """The estimated size of the cached pieces."""
        return self._entries.bytes

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int] | None:
        """The ids a whole-text encode gives, or None when this cannot tell (special tokens
        asked for and the post-processor's were not learnt): the caller encodes whole."""
        if add_special_tokens and self._special is None:
            return None
        parts: list[str | int] = []
        self._cut(text, parts)
        entries = self._entries
        misses = list(dict.fromkeys(p for p in parts if type(p) is str and p not in entries))
        fresh: dict[str, tuple[int, ...]] = {}
        if misses:
            encodings = self._tokenizer.encode_batch_fast(misses, add_special_tokens=False)
            for piece, encoding in zip(misses, encodings, strict=True):
                fresh[piece] = tuple(encoding.ids)
        ids: list[int] = list(self._special[0]) if add_special_tokens and self._special else []
        for part in parts:
            if isinstance(part, int):
                ids.append(part)
                continue
            got = fresh.get(part)
            if got is None:
                got = entries.get(part)
                assert got is not None  # not a miss, and nothing was stored since the look
                self.hits += 1
            ids.extend(got)
        for piece, piece_ids in fresh.items():
            entries.put(piece, piece_ids)
        self.misses += len(misses)
        if add_special_tokens and self._special:
            ids.extend(self._special[1])
        return ids

    # --- cutting

    def _cut(self, text: str, out: list[str | int]) -> None:
        """`text` as added-token ids and text pieces, in order."""
        start = 0
        if self._raw is not None:
            for m in self._raw.finditer(text):
                self._cut_normalized(text, start, m.start(), out)
                out.append(self._ids[m.group()])
                start = m.end()
        self._cut_normalized(text, start, len(text), out)

    def _cut_normalized(self, text: str, start: int, end: int, out: list[str | int]) -> None:
        if self._normalized is not None:
            for m in self._normalized.finditer(text, start, end):
                self._chunks(text, start, m.start(), out)
                out.append(self._ids[m.group()])
                start = m.end()
        self._chunks(text, start, end, out)

    def _chunks(self, text: str, start: int, end: int, out: list[str | int]) -> None:
        """text[start:end] (one segment), cut after the first space at or past every `chunk_chars`
        of the whole text when the pre-tokenizer splits at spaces first."""
        if start >= end:
            return
        if self._spaces:
            mark = (start // self._chunk + 1) * self._chunk
            while mark < end:
                cut = text.find(" ", mark, end - 1)
                if cut < 0:
                    break
                out.append(text[start : cut + 1])
                start = cut + 1
                mark = (start // self._chunk + 1) * self._chunk
        out.append(text[start:end])


def _piece_bytes(piece: str, ids: tuple[int, ...]) -> int:
    return estimated_bytes(len(piece), len(ids))


_PROBES = ("a b", "x")


def _special_ids(tokenizer: Any) -> tuple[list[int], list[int]] | None:
    """The ids the post-processor puts before and after one sequence, the same for two probe
    texts; None when they differ or cannot be found (prompts are then encoded whole)."""
    found: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    for probe in _PROBES:
        bare = tokenizer.encode(probe, add_special_tokens=False).ids
        full = tokenizer.encode(probe, add_special_tokens=True).ids
        spots = [k for k in range(len(full) - len(bare) + 1) if full[k : k + len(bare)] == bare]
        if len(spots) != 1 or not bare:
            return None
        k = spots[0]
        found.add((tuple(full[:k]), tuple(full[k + len(bare) :])))
    if len(found) != 1:
        return None
    before, after = found.pop()
    return list(before), list(after)
