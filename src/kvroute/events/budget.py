"""Ingest budgets: token buckets of events and bytes per second, per source and for the whole
process, so one flooding engine cannot make the gateway do unbounded work (docs/design.md §16)."""

from __future__ import annotations

from collections.abc import Callable

from kvroute.core import IngestLimits

__all__ = ["IngestBudget", "TokenBucket"]


class TokenBucket:
    """`rate` tokens per second, at most `rate * burst_s` saved up; a rate of 0 never limits.

    Work is admitted while the bucket is not in debt and charged afterwards (`charge` may take
    it below zero): a batch's cost in events is known only once it is decoded, and the debt
    then holds the next batches back until the rate has paid it off.
    """

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst_s: float, now: float) -> None:
        self.rate = max(0.0, rate)
        self.capacity = self.rate * max(0.0, burst_s)
        self.tokens = self.capacity
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def ready(self, now: float) -> bool:
        """Not in debt (always, without a rate)."""
        if not self.rate:
            return True
        self._refill(now)
        return self.tokens >= 0.0

    def charge(self, amount: float, now: float) -> None:
        if self.rate:
            self._refill(now)
            self.tokens -= amount

    def ready_at(self, now: float) -> float:
        """When the bucket is out of debt (now when it is not)."""
        if not self.rate:
            return now
        self._refill(now)
        return now if self.tokens >= 0.0 else now + -self.tokens / self.rate


class _Total:
    """The process-wide buckets every source's budget also draws on."""

    def __init__(self, limits: IngestLimits, now: float) -> None:
        self.events = TokenBucket(limits.total_events_per_s, limits.burst_s, now)
        self.bytes = TokenBucket(limits.total_bytes_per_s, limits.burst_s, now)


class IngestBudget:
    """One source's buckets, plus the process-wide ones shared by every source of a manager
    (`for_source`). `admit(nbytes)` before decoding a batch, `charge_events(n)` after."""

    def __init__(
        self, limits: IngestLimits, clock: Callable[[], float], total: _Total | None = None
    ) -> None:
        self.limits = limits
        self._clock = clock
        now = clock()
        self._total = total if total is not None else _Total(limits, now)
        self._events = TokenBucket(limits.source_events_per_s, limits.burst_s, now)
        self._bytes = TokenBucket(limits.source_bytes_per_s, limits.burst_s, now)
        self._buckets = (self._events, self._bytes, self._total.events, self._total.bytes)
        self.limited = any(b.rate for b in self._buckets)

    def for_source(self) -> IngestBudget:
        """A budget of the next source, sharing this one's process-wide buckets."""
        return IngestBudget(self.limits, self._clock, self._total)

    def admit(self, nbytes: int) -> bool:
        """True, and `nbytes` charged, when no bucket of this source is in debt; False (nothing
        charged: refusing costs the source nothing more) otherwise."""
        if not self.limited:
            return True
        now = self._clock()
        for bucket in self._buckets:
            if not bucket.ready(now):
                return False
        self._bytes.charge(nbytes, now)
        self._total.bytes.charge(nbytes, now)
        return True

    def charge_events(self, n: int) -> None:
        if self.limited:
            now = self._clock()
            self._events.charge(n, now)
            self._total.events.charge(n, now)

    def ready_at(self) -> float:
        """When every bucket of this source is out of debt (clock time)."""
        now = self._clock()
        return max(b.ready_at(now) for b in self._buckets)
