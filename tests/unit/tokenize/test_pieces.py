"""Piece encoding against whole-text encoding, differentially over tokenizers built here (no
downloads): the bench's, a byte-level BPE, Metaspace, WordPiece, WordLevel; and the refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import (
    AddedToken,
    Tokenizer,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from kvroute.bench.sim_tokenizer_files import write_sim_tokenizer
from kvroute.sim.tokenizer import SimTokenizer
from kvroute.tokenize import LocalTokenizer
from kvroute.tokenize.pieces import PieceEncoder

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a kv cache aware router sends requests to the engine that holds the prefix",
    "you are a helpful assistant answer the question briefly and clearly",
    "Hello World, THIS is 1234 tiny tests: don't stop! l'été à Paris",
] * 4
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|user|>"]
# Fragments the texts are made of: words, whitespace of several kinds, punctuation, every
# added token, text next to them, and characters Python and Rust class differently.
FRAGMENTS = [
    "the", "quick", "brown", "fox", "kv", "cache", "Hello", "THIS", "été", "1234", "don't",
    " ", "  ", "\n", "\n\n", "\t", " \n ", ",", ".", "!", "'s", "é", "\u00a0", "\u3000", "\x1c",
    *SPECIALS, "<s", "im_start|>", "<|im", "ab", "bc", "abc",
]  # fmt: skip
TEXTS = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3)), max_size=60).map(
    "".join
)
SHARED_FIXTURE = HealthCheck.function_scoped_fixture  # module-scoped: one cache over examples
CHUNK = 8  # small, so that the short texts here are cut after spaces too


def _sim(directory: Path) -> Tokenizer:
    tokenizer_json, _ = write_sim_tokenizer(SimTokenizer(), directory)
    return Tokenizer.from_file(str(tokenizer_json))


def _byte_level_bpe(directory: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    return tok


def _metaspace(directory: Path, scheme: str = "always") -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS))
    return tok


def _wordpiece(directory: Path) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=SPECIALS)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def _whitespace_wordlevel(directory: Path) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    return tok


def _two_passes(directory: Path) -> Tokenizer:
    """No normalizer; "ab" matched after normalization, "bc" before: tokenizers matches the
    raw-text tokens first, so "abc" is "a" + "bc" (one pass of both would give "ab" + "c")."""
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "c": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.add_tokens([AddedToken("ab", normalized=True)])
    tok.add_special_tokens([AddedToken("bc", normalized=False, special=True)])
    return tok


BUILDERS = {
    "sim": (_sim, "added tokens and spaces"),
    "byte_level_bpe": (_byte_level_bpe, "added tokens"),
    "metaspace_always": (_metaspace, "added tokens"),
    "wordpiece_lowercase": (_wordpiece, "added tokens and spaces"),
    "two_passes": (_two_passes, "added tokens"),
    "whitespace_wordlevel": (_whitespace_wordlevel, "added tokens and spaces"),
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def built(request: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Any, str]:
    build, how = BUILDERS[request.param]
    tok = build(tmp_path_factory.mktemp(request.param))
    encoder, said = PieceEncoder.build(tok, max_bytes=1 << 20, chunk_chars=CHUNK)
    assert encoder is not None, said
    assert said == how  # cut after spaces only where a whitespace pre-tokenizer runs first
    return tok, encoder, said


@settings(max_examples=300, deadline=None, suppress_health_check=[SHARED_FIXTURE])
@given(text=TEXTS, special=st.booleans())
def test_pieces_give_exactly_the_whole_text_ids(built: Any, text: str, special: bool) -> None:
    tok, encoder, _ = built
    whole = tok.encode(text, add_special_tokens=special).ids
    # Twice: the second time its pieces come from the cache.
    assert encoder.encode(text, add_special_tokens=special) == whole
    assert encoder.encode(text, add_special_tokens=special) == whole


@settings(max_examples=100, deadline=None, suppress_health_check=[SHARED_FIXTURE])
@given(shared=TEXTS, first=TEXTS, second=TEXTS)
def test_texts_with_a_common_start_reuse_its_pieces(
    built: Any, shared: str, first: str, second: str
) -> None:
    tok, encoder, _ = built
    for text in (shared + first, shared + second):
        assert encoder.encode(text, add_special_tokens=True) == tok.encode(text).ids


def test_a_shared_prefix_costs_lookups_not_encoding(tmp_path: Path) -> None:
    sim = SimTokenizer()
    tok = _sim(tmp_path)
    encoder, _ = PieceEncoder.build(tok, max_bytes=1 << 20)
    assert encoder is not None
    prefix = sim.make_text(512, "prefix")
    for i in range(3):
        text = f"{prefix} {sim.make_text(512, i)}"
        assert encoder.encode(text, add_special_tokens=True) == tok.encode(text).ids
    # The prefix's pieces were encoded once; later texts looked them up.
    assert encoder.hits >= 2 * (len(prefix) // 512 - 1)


def test_the_cache_stays_within_its_bytes(tmp_path: Path) -> None:
    tok = _sim(tmp_path)
    encoder, _ = PieceEncoder.build(tok, max_bytes=4096, chunk_chars=64)
    assert encoder is not None
    sim = SimTokenizer()
    for i in range(50):
        text = sim.make_text(200, i)
        assert (
            encoder.encode(text, add_special_tokens=False)
            == tok.encode(text, add_special_tokens=False).ids
        )
        assert encoder.bytes <= 4096
    assert 0 < len(encoder) < 50


def test_raw_text_tokens_are_matched_before_normalized_ones(tmp_path: Path) -> None:
    tok = _two_passes(tmp_path)
    encoder, _ = PieceEncoder.build(tok, max_bytes=1 << 20)
    assert encoder is not None
    assert tok.encode("abc", add_special_tokens=False).tokens == ["a", "bc"]
    assert encoder.encode("abc", add_special_tokens=False) == [1, tok.token_to_id("bc")]


def _lstrip(directory: Path) -> Tokenizer:
    tok = _wordpiece(directory)
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    return tok


def _normalized_with_normalizer(directory: Path) -> Tokenizer:
    tok = _wordpiece(directory)
    tok.add_tokens([AddedToken("Brown Fox", normalized=True)])
    return tok


def _truncating(directory: Path) -> Tokenizer:
    tok = _wordpiece(directory)
    tok.enable_truncation(16)
    return tok


REFUSED = {
    "metaspace_first": (lambda d: _metaspace(d, "first"), "prepend_scheme first"),
    "lstrip": (_lstrip, "lstrip"),
    "normalized_token": (_normalized_with_normalizer, "after normalization"),
    "truncation": (_truncating, "truncation"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_tokenizers_where_pieces_could_differ_are_encoded_whole(name: str, tmp_path: Path) -> None:
    build, why = REFUSED[name]
    tok = build(tmp_path)
    encoder, said = PieceEncoder.build(tok, max_bytes=1 << 20)
    assert encoder is None
    assert why in said


def test_metaspace_first_would_differ_if_cut(tmp_path: Path) -> None:
    """Why it is refused: the text after an added token gets no "▁" in the whole text, but
    would alone."""
    tok = _metaspace(tmp_path, "first")
    whole = tok.encode("fox<|user|>dog", add_special_tokens=False).ids
    cut = [
        *tok.encode("fox", add_special_tokens=False).ids,
        tok.token_to_id("<|user|>"),
        *tok.encode("dog", add_special_tokens=False).ids,
    ]
    assert whole != cut


def test_local_tokenizer_says_how_it_encodes_and_stays_exact(tmp_path: Path) -> None:
    sim = SimTokenizer()
    tokenizer_json, template = write_sim_tokenizer(sim, tmp_path / "sim")
    local = LocalTokenizer(tokenizer_json, template.read_text(), bos_token="<s>")
    assert local.encoding_mode == "pieces at added tokens and spaces"
    assert local.piece_cache is not None
    text = sim.make_text(600, "p")
    assert local.encode_prompt(text) == sim.encode(text)
    off = LocalTokenizer(tokenizer_json, template.read_text(), piece_cache_bytes=0)
    assert off.encoding_mode == "whole texts: piece_cache_bytes is 0"
    assert off.piece_cache is None
    assert off.encode_prompt(text) == sim.encode(text)
    lstrip = tmp_path / "lstrip.json"
    _lstrip(tmp_path).save(str(lstrip))
    refused = LocalTokenizer(lstrip)
    assert refused.encoding_mode.startswith("whole texts: added token '<mask>' has lstrip")
    assert (
        refused.encode_prompt("the fox <mask> dog")
        == Tokenizer.from_file(str(lstrip)).encode("the fox <mask> dog").ids
    )
