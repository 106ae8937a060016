"""CachingTokenizer: a bounded LRU over a real LocalTokenizer, counted by a recording wrapper."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from kvroute.errors import ConfigError, TokenizeError
from kvroute.tokenize import CachingTokenizer, LocalTokenizer

TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"


class _Recording:
    """Passes calls to a real tokenizer and records them (what reached the inner tokenizer)."""

    def __init__(self, inner: LocalTokenizer) -> None:
        self.inner = inner
        self.calls: list[tuple[Any, ...]] = []
        self.fail = False
        self.gate: asyncio.Event | None = None  # when set, calls wait for it (a slow engine)

    async def tokenize_prompt(self, model: str, prompt: str | list[int]) -> list[int]:
        self.calls.append(("prompt", model, prompt))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise TokenizeError("engine down")
        return await self.inner.tokenize_prompt(model, prompt)

    async def tokenize_chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        self.calls.append(("chat", model, add_generation_prompt, chat_template_kwargs))
        return await self.inner.tokenize_chat(
            model,
            messages,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=chat_template_kwargs,
        )


@pytest.fixture
def recording(tmp_path: Path) -> _Recording:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["one two three four five six user system hello"],
        trainers.WordLevelTrainer(special_tokens=["[UNK]"]),
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    return _Recording(LocalTokenizer(tmp_path / "tokenizer.json", TEMPLATE))


def _cache(inner: _Recording, **kw: Any) -> CachingTokenizer:
    return CachingTokenizer(inner, **{"max_entries": 4096, **kw})


async def test_repeated_prompt_hits_the_cache(recording: _Recording) -> None:
    cache = _cache(recording)
    first = await cache.tokenize_prompt("m", "one two")
    second = await cache.tokenize_prompt("m", "one two")
    assert first == second == await recording.inner.tokenize_prompt("m", "one two")
    assert len(recording.calls) == 1
    assert (cache.hits, cache.misses) == (1, 1)


async def test_cache_key_includes_the_model(recording: _Recording) -> None:
    cache = _cache(recording)
    await cache.tokenize_prompt("a", "one")
    await cache.tokenize_prompt("b", "one")
    assert len(recording.calls) == 2


async def test_mutating_a_returned_list_does_not_corrupt_the_cache(recording: _Recording) -> None:
    cache = _cache(recording)
    ids = await cache.tokenize_prompt("m", "one two")
    expected = list(ids)
    ids.append(999)
    again = await cache.tokenize_prompt("m", "one two")
    again.clear()
    assert await cache.tokenize_prompt("m", "one two") == expected


async def test_least_recently_used_entry_is_evicted_first(recording: _Recording) -> None:
    cache = _cache(recording, max_entries=2)
    await cache.tokenize_prompt("m", "one")
    await cache.tokenize_prompt("m", "two")
    await cache.tokenize_prompt("m", "one")  # "two" is now least recently used
    await cache.tokenize_prompt("m", "three")  # evicts "two"
    assert len(cache) == 2
    recording.calls.clear()
    await cache.tokenize_prompt("m", "one")
    await cache.tokenize_prompt("m", "three")
    assert recording.calls == []
    await cache.tokenize_prompt("m", "two")
    assert recording.calls == [("prompt", "m", "two")]


async def test_cache_stays_bounded(recording: _Recording) -> None:
    cache = _cache(recording, max_entries=5)
    for i in range(50):
        await cache.tokenize_prompt("m", f"one {i}")
    assert len(cache) == 5


async def test_chat_key_ignores_dict_key_order_but_not_flags(recording: _Recording) -> None:
    cache = _cache(recording)
    await cache.tokenize_chat("m", [{"role": "user", "content": "hello"}])
    await cache.tokenize_chat("m", [{"content": "hello", "role": "user"}])
    assert len(recording.calls) == 1
    await cache.tokenize_chat(
        "m", [{"role": "user", "content": "hello"}], add_generation_prompt=False
    )
    await cache.tokenize_chat(
        "m", [{"role": "user", "content": "hello"}], chat_template_kwargs={"x": 1}
    )
    assert len(recording.calls) == 3


async def test_a_chat_prompt_and_a_text_prompt_do_not_share_entries(recording: _Recording) -> None:
    cache = _cache(recording)
    await cache.tokenize_prompt("m", '[{"content": "hello", "role": "user"}]')
    await cache.tokenize_chat("m", [{"role": "user", "content": "hello"}])
    assert len(recording.calls) == 2


async def test_failures_are_not_cached(recording: _Recording) -> None:
    cache = _cache(recording)
    recording.fail = True
    with pytest.raises(TokenizeError):
        await cache.tokenize_prompt("m", "one")
    recording.fail = False
    assert await cache.tokenize_prompt("m", "one") == await recording.inner.tokenize_prompt(
        "m", "one"
    )
    assert len(recording.calls) == 2


async def test_token_id_prompts_bypass_the_cache(recording: _Recording) -> None:
    cache = _cache(recording)
    assert await cache.tokenize_prompt("m", [4, 5]) == [4, 5]
    assert recording.calls == [] and len(cache) == 0
    with pytest.raises(TokenizeError):
        await cache.tokenize_prompt("m", [4, "5"])  # type: ignore[list-item]


async def test_unserialisable_messages_go_to_the_inner_tokenizer_uncached(
    recording: _Recording,
) -> None:
    cache = _cache(recording)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "one", "extra": {1, 2}}]
    await cache.tokenize_chat("m", messages)
    await cache.tokenize_chat("m", messages)
    assert len(recording.calls) == 2 and len(cache) == 0


async def test_cache_hits_are_timed_as_mode_cache(recording: _Recording) -> None:
    seen: list[str] = []
    cache = _cache(recording, observe=lambda mode, _s: seen.append(mode))
    await cache.tokenize_prompt("m", "one")
    await cache.tokenize_prompt("m", "one")
    await cache.tokenize_chat("m", [{"role": "user", "content": "one"}])
    await cache.tokenize_chat("m", [{"role": "user", "content": "one"}])
    assert seen == ["cache", "cache"]  # misses are timed by the inner tokenizer


def test_max_entries_must_be_positive(recording: _Recording) -> None:
    with pytest.raises(ConfigError, match="max_entries: expected >= 1, got 0"):
        CachingTokenizer(recording, max_entries=0)


async def test_concurrent_misses_share_one_inner_call(recording: _Recording) -> None:
    cache = _cache(recording)
    recording.gate = asyncio.Event()
    waiters = [asyncio.ensure_future(cache.tokenize_prompt("m", "one two")) for _ in range(20)]
    await asyncio.sleep(0)  # let every waiter reach the shared call
    recording.gate.set()
    results = await asyncio.gather(*waiters)
    assert len(recording.calls) == 1
    assert all(r == results[0] for r in results) and results[0]
    results[0].append(7)  # each waiter got its own list
    assert results[1] != results[0]


async def test_a_cancelled_waiter_does_not_cancel_the_shared_call(recording: _Recording) -> None:
    cache = _cache(recording)
    recording.gate = asyncio.Event()
    first = asyncio.ensure_future(cache.tokenize_prompt("m", "one"))
    second = asyncio.ensure_future(cache.tokenize_prompt("m", "one"))
    await asyncio.sleep(0)
    first.cancel()
    recording.gate.set()
    assert await second == await recording.inner.tokenize_prompt("m", "one")
    assert first.cancelled()
    assert len(recording.calls) == 1 and len(cache) == 1


async def test_a_shared_failure_reaches_every_waiter_and_is_not_cached(
    recording: _Recording,
) -> None:
    cache = _cache(recording)
    recording.gate = asyncio.Event()
    recording.fail = True
    waiters = [asyncio.ensure_future(cache.tokenize_prompt("m", "one")) for _ in range(3)]
    await asyncio.sleep(0)
    recording.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, TokenizeError) for r in results)
    assert len(recording.calls) == 1 and len(cache) == 0
    recording.fail = False
    await cache.tokenize_prompt("m", "one")
    assert len(recording.calls) == 2


async def test_the_cache_holds_at_most_its_byte_bound_and_never_one_prompt_larger_than_it(
    recording: _Recording,
) -> None:
    words = "one two three four five six"
    # Each entry: 256 + its text + 36 per id; 6 ids of a 27-character prompt: ~500 bytes.
    cache = _cache(recording, max_bytes=1_500)
    prompts = [f"{words} {'one ' * i}".strip() for i in range(4)]
    for prompt in prompts:
        await cache.tokenize_prompt("m", prompt)
    assert len(cache) == 2 and cache.bytes <= 1_500  # the two most recent
    await cache.tokenize_prompt("m", prompts[-1])
    assert cache.hits == 1
    calls = len(recording.calls)
    await cache.tokenize_prompt("m", prompts[0])  # evicted: tokenized again
    assert len(recording.calls) == calls + 1
    huge = " ".join(["one"] * 200)  # 7,000+ bytes estimated: larger than the bound
    before = cache.bytes
    assert len(await cache.tokenize_prompt("m", huge)) == 200
    assert cache.bytes == before  # not kept, and nothing pushed out for it
    await cache.tokenize_prompt("m", huge)
    assert len(recording.calls) == calls + 3
