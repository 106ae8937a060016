"""A bounded LRU in front of any tokenizer, keyed by model, prompt or messages, and flags."""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from kvroute.errors import ConfigError
from kvroute.tokenize.ids import require_token_ids
from kvroute.tokenize.protocol import Tokenizer
from kvroute.tokenize.timing import Observe, observe_since

__all__ = ["CachingTokenizer", "IdsLru", "estimated_bytes"]

_Key = tuple[Any, ...]
# What an entry costs, roughly and on the high side: its key's text, and per id a tuple slot and
# an int object (CPython shares only ints below 257), plus the dict's and tuple's own overhead.
_BYTES_PER_ID = 36
_BYTES_PER_ENTRY = 256


def estimated_bytes(text_chars: int, ids: int) -> int:
    """What an entry of `ids` ids keyed by `text_chars` characters of text costs, on the high
    side (the piece cache, tokenize/pieces.py, counts the same way)."""
    return _BYTES_PER_ENTRY + text_chars + _BYTES_PER_ID * ids


def _entry_bytes(key: _Key, ids: tuple[int, ...]) -> int:
    return estimated_bytes(sum(len(part) for part in key if isinstance(part, str)), len(ids))


K = TypeVar("K", bound=Hashable)


class IdsLru(Generic[K]):
    """Token ids by key, least recently used out first, within `max_entries` (None: no bound)
    and `max_bytes` of `size_of(key, ids)` (0: no bound); one entry larger than the whole byte
    bound is not kept (it would push every other out). The tokenizer cache and the piece cache
    (tokenize/pieces.py) both keep theirs here."""

    def __init__(
        self,
        size_of: Callable[[K, tuple[int, ...]], int],
        *,
        max_entries: int | None = None,
        max_bytes: int = 0,
    ) -> None:
        self._size_of = size_of
        self._max = max_entries
        self._max_bytes = max(0, max_bytes)
        self.bytes = 0  # the estimated size of what is kept
        self._entries: OrderedDict[K, tuple[int, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def get(self, key: K) -> tuple[int, ...] | None:
        """The ids of `key`, now the most recently used, or None."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: K, ids: tuple[int, ...]) -> None:
        size = self._size_of(key, ids)
        if self._max_bytes and size > self._max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= self._size_of(key, old)
        self._entries[key] = ids
        self.bytes += size
        while (self._max is not None and len(self._entries) > self._max) or (
            self._max_bytes and self.bytes > self._max_bytes
        ):
            gone_key, gone = self._entries.popitem(last=False)
            self.bytes -= self._size_of(gone_key, gone)


class CachingTokenizer:
    """Remembers the ids of the last `max_entries` distinct requests, in at most `max_bytes`
    (0: no byte bound); the least recently used go first, and one entry larger than the whole
    bound is not kept (it would push every other out).

    Concurrent misses on one key share a single inner call (a burst of identical requests
    tokenizes once); a caller cancelled meanwhile does not cancel it for the others. Failures
    are not cached. Prompts given as token ids bypass the cache. Callers get a fresh list each
    time, so mutating it cannot corrupt the cache. A hit is reported to `observe` as mode
    `cache`; a miss is reported by the inner tokenizer.
    """

    def __init__(
        self,
        inner: Tokenizer,
        *,
        max_entries: int,
        max_bytes: int = 0,
        observe: Observe | None = None,
    ) -> None:
        if max_entries < 1:
            raise ConfigError(f"max_entries: expected >= 1, got {max_entries}")
        self._inner = inner
        self._observe = observe
        self._entries = IdsLru[_Key](_entry_bytes, max_entries=max_entries, max_bytes=max_bytes)
        self._pending: dict[_Key, asyncio.Task[tuple[int, ...]]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """The estimated size of what is kept (_entry_bytes)."""
        return self._entries.bytes

    async def tokenize_prompt(self, model: str, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return list(require_token_ids(prompt, "prompt"))
        key: _Key = ("prompt", model, prompt)
        started = time.perf_counter()
        cached = self._lookup(key, started)
        if cached is not None:
            return cached
        return await self._shared(key, lambda: self._inner.tokenize_prompt(model, prompt))

    async def tokenize_chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        started = time.perf_counter()
        try:
            key: _Key | None = (
                "chat",
                model,
                json.dumps(messages, sort_keys=True),
                add_generation_prompt,
                json.dumps(chat_template_kwargs, sort_keys=True),
            )
        except (TypeError, ValueError):
            key = None  # not JSON-serialisable: let the inner tokenizer judge it, uncached

        def call() -> Awaitable[list[int]]:
            return self._inner.tokenize_chat(
                model,
                messages,
                add_generation_prompt=add_generation_prompt,
                chat_template_kwargs=chat_template_kwargs,
            )

        if key is None:
            return await call()
        cached = self._lookup(key, started)
        if cached is not None:
            return cached
        return await self._shared(key, call)

    async def _shared(self, key: _Key, call: Callable[[], Awaitable[list[int]]]) -> list[int]:
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fill(key, call))
            # Every waiter may be cancelled; mark a failure as seen so it is not logged at GC.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._pending[key] = task
        return list(await asyncio.shield(task))

    async def _fill(self, key: _Key, call: Callable[[], Awaitable[list[int]]]) -> tuple[int, ...]:
        try:
            ids = tuple(await call())
        finally:
            self._pending.pop(key, None)
        self._entries.put(key, ids)
        return ids

    def _lookup(self, key: _Key, started: float) -> list[int] | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        observe_since(self._observe, "cache", started)
        return list(entry)
