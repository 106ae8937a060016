"""tests/benchmark/per_message.py at a tiny size: real sockets, every message accounted for (not
speed), and the py-spy summary's classification."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmark.per_message import run_burst, summarise


@pytest.mark.parametrize("index", ["real", "null"])
async def test_burst_applies_every_message_once(index: str) -> None:
    result = await run_burst(10, index, messages=200)
    assert (result.messages, result.dropped, result.gaps) == (200, 0, 0)
    assert result.applied_events == (2_000 if index == "real" else 0)
    assert result.wall_us > 0 and result.cpu_us > 0


def test_summary_puts_each_sample_in_one_row(tmp_path: Path) -> None:
    loop = "main (x.py:1);BaseEventLoop.run_forever (asyncio/base_events.py:607)"
    handle = f"{loop};Handle._run (asyncio/events.py:80)"
    task = f"{handle};_SourceTask.run (kvroute/events/subscriber.py:1)"
    on_live = f"{task};SourceTracker.on_live (kvroute/events/tracker.py:1)"
    raw = tmp_path / "prof.txt"
    raw.write_text(
        f"{on_live};BatchDecoder.decode (kvroute/events/wire.py:1) 30\n"
        f"{on_live};PrefixIndex.apply (kvroute/index/prefix_index.py:1) 50\n"
        f"{on_live} 20\n"
        f"{loop};BaseEventLoop._run_once (asyncio/base_events.py:1);"
        "EpollSelector.select (selectors.py:1) 500\n"
        f"{handle};run_burst (tests/benchmark/per_message.py:1) 70\n"
    )
    shares = dict(summarise(str(raw)))
    assert shares["index apply (PrefixIndex.apply)"] == pytest.approx(50.0)
    assert shares["decode (msgspec + the no-copy check, events/wire.py)"] == pytest.approx(30.0)
    assert shares["tracker: seq check and bookkeeping (events/tracker.py)"] == pytest.approx(20.0)
    assert sum(shares.values()) == pytest.approx(100.0)
