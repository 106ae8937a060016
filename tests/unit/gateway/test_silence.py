"""Silent sources (gateway/silence.py): flagged only when the engine answered requests while the
source heard nothing for `after_s`, cleared as soon as it hears anything."""

from __future__ import annotations

import logging

import pytest

from kvroute.core import SourceStatus, source_id
from kvroute.gateway.silence import SilentSources

SOURCE = source_id("e", 0)


class World:
    def __init__(self) -> None:
        self.now = 0.0
        self.quiet_s = 0.0
        self.connected = True
        self.served = 0
        self.present = True

    def statuses(self) -> list[SourceStatus]:
        if not self.present:
            return []
        return [
            SourceStatus(
                source=SOURCE,
                engine="e",
                rank=0,
                endpoint="tcp://127.0.0.1:5557",
                connected=self.connected,
                last_seq=None,
                stale=False,
                stale_reason=None,
                last_batch_age_s=None,
                blocks=0,
                quiet_s=self.quiet_s,
            )
        ]

    def advance(self, seconds: float, *, heard: bool = False) -> None:
        self.now += seconds
        self.quiet_s = 0.0 if heard else self.quiet_s + seconds


def _watch(world: World) -> SilentSources:
    return SilentSources(10.0, world.statuses, lambda engine: world.served, lambda: world.now)


def _flag(world: World, watch: SilentSources, served: int = 1) -> None:
    """Quiet for after_s, `served` requests answered, and time for their events to come."""
    world.advance(10.0)
    watch.check()
    world.served += served
    watch.check()
    world.advance(5.0)
    watch.check()


def test_an_idle_engine_is_never_flagged() -> None:
    world = World()
    watch = _watch(world)
    for _ in range(100):
        world.advance(5.0)
        watch.check()
    assert watch.silent() == frozenset()


def test_requests_answered_while_quiet_flag_the_source_once_they_had_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = World()
    watch = _watch(world)
    world.served = 3  # answered while it was still heard: not counted
    world.advance(10.0)
    watch.check()  # quiet for after_s: the base is taken here
    world.served = 4
    watch.check()
    assert watch.silent() == frozenset()  # the request may not have made its event yet
    world.advance(4.9)
    watch.check()
    assert watch.silent() == frozenset()
    with caplog.at_level(logging.WARNING, logger="kvroute.gateway.silence"):
        world.advance(0.2)
        watch.check()
        watch.check()
    assert watch.silent() == {SOURCE}
    [record] = caplog.records  # logged once, not per check
    assert "topic" in record.getMessage() and "1 request(s)" in record.getMessage()


def test_hearing_anything_clears_the_flag_and_the_base() -> None:
    world = World()
    watch = _watch(world)
    _flag(world, watch)
    assert watch.silent() == {SOURCE}
    world.advance(0.1, heard=True)
    watch.check()
    assert watch.silent() == frozenset()
    world.advance(10.0)
    watch.check()  # quiet again: a new base, nothing served since
    world.advance(10.0)
    watch.check()
    assert watch.silent() == frozenset()


def test_an_unconnected_source_names_the_endpoint_causes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = World()
    world.connected = False
    watch = _watch(world)
    with caplog.at_level(logging.WARNING, logger="kvroute.gateway.silence"):
        _flag(world, watch, served=2)
    assert watch.silent() == {SOURCE}
    assert "must bind" in caplog.records[0].getMessage()


def test_a_removed_source_is_forgotten() -> None:
    world = World()
    watch = _watch(world)
    _flag(world, watch)
    assert watch.silent() == {SOURCE}
    world.present = False
    watch.check()
    assert watch.silent() == frozenset()


def test_the_check_interval_follows_the_threshold() -> None:
    world = World()
    assert SilentSources(1.0, world.statuses, lambda e: 0).interval_s == 0.25
    assert SilentSources(60.0, world.statuses, lambda e: 0).interval_s == 5.0
    assert SilentSources(0.01, world.statuses, lambda e: 0).interval_s == 0.05
