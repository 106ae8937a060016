"""A source restored from a snapshot (`SourceTracker.restore`): unconfirmed and stale until the
engine continues the restored seq, dropped and resynced otherwise. Never larger than the truth.
Same rig as test_tracker.py: no sockets, no sleeps."""

from __future__ import annotations

import pytest

from kvroute.core import ReplayOutcome, ResetCause
from kvroute.events import ReplayKind, ReplayRequest
from tests.unit.events.test_tracker import BS, MODEL, SOURCE, Engine, Rig


def _restored(engine: Engine, batches: int) -> Rig:
    """A gateway that followed `engine` for `batches` batches, snapshotted, and restarted: a
    fresh rig whose index and tracker hold what the snapshot kept."""
    before = Rig()
    before.attach(engine)
    for _ in range(batches):
        before.live(engine, engine.batch())
    export = before.index.export_source(SOURCE)
    state = before.tracker.recovery_state()
    assert export is not None and state is not None and export.blocks == batches
    after = Rig()
    assert after.index.restore_source(SOURCE, export) == batches
    after.tracker.restore(*state)
    return after


def _matched(rig: Rig, engine: Engine) -> int:
    """Blocks `match` credits to the engine for the prompt of every batch sent so far."""
    tokens = [engine.first_token + h * BS + i for h in range(1, 4) for i in range(BS)]
    result = rig.index.match(MODEL, None, tokens).get("e")
    return 0 if result is None else result.blocks


def test_restored_blocks_count_for_nothing_until_the_engine_confirms_them() -> None:
    engine = Engine()
    rig = _restored(engine, 5)
    assert rig.tracker.unconfirmed and rig.tracker.stale and not rig.tracker.settled
    rig.assert_single_owner()
    assert rig.held() == engine.reference()  # held, but stale: match does not count them
    assert _matched(rig, engine) == 0
    request = rig.tracker.on_connect()
    assert request == ReplayRequest(4, ReplayKind.CONFIRM)  # from the last seq: its bytes
    rig.serve(request, engine)  # nothing new: seq 4 again and the end marker
    assert not rig.tracker.unconfirmed and not rig.tracker.stale and rig.tracker.settled
    rig.assert_single_owner()
    assert _matched(rig, engine) == 3
    assert rig.replays(ReplayOutcome.OK) == 1


def test_batches_published_while_the_gateway_was_down_are_replayed_then_confirmed() -> None:
    engine = Engine()
    rig = _restored(engine, 5)
    for _ in range(4):
        engine.batch()  # published while no gateway listened
    rig.serve(rig.tracker.on_connect(), engine)
    assert rig.tracker.last == 8 and not rig.tracker.stale
    assert rig.held() == engine.reference()
    assert rig.live(engine, engine.batch()) is None
    assert rig.held() == engine.reference()


@pytest.mark.parametrize("complete", [True, False], ids=["partial", "timeout"])
def test_an_engine_that_cannot_prove_continuity_loses_the_restored_blocks(complete: bool) -> None:
    engine = Engine(window=3)
    rig = _restored(engine, 5)
    for _ in range(6):
        engine.batch()  # more than the buffer keeps: seq 5 is gone
    request = rig.tracker.on_connect()
    assert request is not None and request.kind is ReplayKind.CONFIRM
    if complete:
        rig.serve(request, engine)
    else:  # the replay timed out: nothing proven either
        follow = rig.tracker.on_replay(request, [], False)
        assert follow == ReplayRequest(0, ReplayKind.BOOTSTRAP)
        rig.serve(follow, engine)
    assert rig.resets(ResetCause.UNCONFIRMED) == 1
    assert not rig.tracker.unconfirmed and not rig.tracker.stale and rig.tracker.settled
    # A late joiner's subset of the truth: nothing of the snapshot survives the drop.
    assert rig.held() <= engine.reference()
    assert [r.kind for r in rig.requests][-1] is ReplayKind.BOOTSTRAP


@pytest.mark.parametrize("published", [2, 4, 7], ids=["fewer", "up_to_last", "past_last"])
def test_a_restarted_engine_never_brings_back_the_old_blocks(published: int) -> None:
    old = Engine()
    rig = _restored(old, 5)
    new = Engine(first_token=10_000)  # a new process: seqs from 0, other contents and bytes
    for _ in range(published):
        new.batch()
    # Whether or not the new process has reached seq 4 (and beyond), its seq 4 is not ours.
    rig.serve(rig.tracker.on_connect(), new)
    assert rig.resets(ResetCause.UNCONFIRMED) == 1
    assert [r.kind for r in rig.requests] == [ReplayKind.CONFIRM, ReplayKind.BOOTSTRAP]
    assert rig.held() == new.reference()
    assert not rig.held() & old.reference()
    assert not rig.tracker.stale and rig.tracker.settled


def test_a_source_without_a_replay_endpoint_is_never_restored() -> None:
    rig = Rig(replay=False)
    with pytest.raises(ValueError, match="no replay endpoint"):
        rig.tracker.restore(4, b"x" * 16)
    engine = Engine()
    rig.attach(engine)
    rig.live(engine, engine.batch())
    assert rig.tracker.recovery_state() is None  # nothing a later start could confirm


def test_a_live_batch_before_the_confirmation_waits_for_it() -> None:
    engine = Engine()
    rig = _restored(engine, 5)
    engine.batch()
    request = rig.live(engine, engine.batch())  # the socket delivered it before on_connect
    assert request == ReplayRequest(4, ReplayKind.CONFIRM)
    rig.serve(request, engine)
    assert rig.tracker.last == 6 and not rig.tracker.stale
    assert rig.held() == engine.reference()


def test_a_disconnect_before_confirmation_drops_the_restore() -> None:
    engine = Engine()
    rig = _restored(engine, 5)
    rig.tracker.on_disconnect()
    assert not rig.tracker.unconfirmed and rig.held() == set()
    rig.attach(engine)  # bootstraps from 0 as on first contact
    assert rig.held() == engine.reference()
