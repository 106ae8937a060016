"""PrefillBacklog: prompt tokens queued for prefill per engine, drained at the prefill speed."""

from __future__ import annotations

import pytest

from kvroute.routing.backlog import PrefillBacklog


def test_an_engine_never_sent_anything_has_nothing_queued() -> None:
    assert PrefillBacklog().pending("a", now=5.0) == 0.0


def test_tokens_drain_at_the_prefill_speed_and_never_below_zero() -> None:
    backlog = PrefillBacklog(1000.0)
    backlog.add("a", 3000, now=10.0)
    assert backlog.pending("a", now=10.0) == 3000.0
    assert backlog.pending("a", now=11.5) == pytest.approx(1500.0)
    assert backlog.pending("a", now=13.0) == 0.0
    assert backlog.pending("a", now=99.0) == 0.0
    assert backlog.pending("b", now=11.5) == 0.0  # per engine


def test_a_request_joins_what_is_left_of_the_queue() -> None:
    backlog = PrefillBacklog(1000.0)
    backlog.add("a", 3000, now=0.0)
    backlog.add("a", 500, now=1.0)  # 2000 left + 500
    assert backlog.pending("a", now=1.0) == pytest.approx(2500.0)
    backlog.add("a", 100, now=10.0)  # the queue emptied meanwhile: idle time is not banked
    assert backlog.pending("a", now=10.0) == pytest.approx(100.0)
    backlog.add("a", -50, now=10.0)  # nonsense adds nothing
    assert backlog.pending("a", now=10.0) == pytest.approx(100.0)


def test_clear_empties_one_engine() -> None:
    backlog = PrefillBacklog(1000.0)
    backlog.add("a", 3000, now=0.0)
    backlog.add("b", 3000, now=0.0)
    backlog.clear("a")
    backlog.clear("never-seen")
    assert (backlog.pending("a", now=0.0), backlog.pending("b", now=0.0)) == (0.0, 3000.0)


@pytest.mark.parametrize("speed", [0.0, -1.0, float("nan")])
def test_speed_must_be_positive(speed: float) -> None:
    with pytest.raises(ValueError, match="tokens_per_s"):
        PrefillBacklog(speed)
