"""`kvroute events decode|listen` run as the real console script against our ZmqEventPublisher."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio

from kvroute.events.cli import batch_to_json
from kvroute.events.publisher import ZmqEventPublisher
from kvroute.events.vllm_events import VllmBlockRemoved, VllmBlockStored, VllmEventBatch
from tests.shared_fixtures import event_fixtures_dir, scenarios

DEADLINE_S = 10.0
RELEASES = ["0.9.0", "0.22.0", "0.26.0", "0.33.0"]


def _command() -> list[str]:
    script = Path(sys.executable).parent / "kvroute"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kvroute.cli"]


def _batch(i: int, release: str) -> VllmEventBatch:
    rank = None if release == "0.9.0" else 0
    stored = VllmBlockStored([2**63 + i, i], None if i == 0 else i - 1, [i, i], 1, None, "GPU")
    return VllmEventBatch(1700000000.0 + i, [stored, VllmBlockRemoved([i], "GPU")], rank)


def _expected_line(seq: int, batch: VllmEventBatch, release: str) -> dict[str, Any]:
    # What the release can carry: 0.9.0 has no medium, and none has group_idx here.
    meaning = batch_to_json(batch)
    if release == "0.9.0":
        for event in meaning["events"]:
            event["medium"] = None
    return {"seq": seq, **meaning}


class _Cli:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), DEADLINE_S)
        assert raw, "listener exited early"
        decoded: dict[str, Any] = json.loads(raw)
        return decoded

    async def stop(self, sig: int) -> tuple[int, str]:
        self.proc.send_signal(sig)
        assert self.proc.stderr is not None
        code = await asyncio.wait_for(self.proc.wait(), DEADLINE_S)
        return code, (await self.proc.stderr.read()).decode()


@pytest.fixture
async def context() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.term()


async def _listen(*args: str) -> _Cli:
    proc = await asyncio.create_subprocess_exec(
        *_command(),
        "events",
        "listen",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return _Cli(proc)


async def _join(cli: _Cli, pub: ZmqEventPublisher, release: str) -> list[dict[str, Any]]:
    """Publish until the listener prints a live batch (PUB/SUB slow joiner); return its lines."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE_S
    pending: asyncio.Task[dict[str, Any]] | None = None
    while loop.time() < end:
        pub.publish(_batch(pub.next_seq, release))
        pending = pending or asyncio.create_task(cli.line())
        done, _ = await asyncio.wait({pending}, timeout=0.05)
        if done:
            return [pending.result()]
    raise AssertionError("listener never printed a live batch")


@pytest.mark.parametrize("release", RELEASES)
async def test_listen_prints_published_batches(context: zmq.asyncio.Context, release: str) -> None:
    pub = ZmqEventPublisher(topic="kv", release=release, context=context)
    await pub.start()
    cli = await _listen("--endpoint", pub.endpoint, "--topic", "kv")
    try:
        first = await _join(cli, pub, release)
        assert first[0]["seq"] < pub.next_seq
        sent = [(pub.publish(_batch(i, release)), _batch(i, release)) for i in range(3)]
        # Anything still in flight from the probes comes first; then exactly our batches.
        lines = [await cli.line()]
        while lines[-1]["seq"] < sent[0][0]:
            lines.append(await cli.line())
        lines += [await cli.line() for _ in range(2)]
        assert lines[-3:] == [_expected_line(seq, b, release) for seq, b in sent]
        seqs = [line["seq"] for line in first + lines]
        assert seqs == sorted(set(seqs))
        code, stderr = await cli.stop(signal.SIGINT)
        assert (code, _errors(stderr)) == (0, [])
    finally:
        if cli.proc.returncode is None:
            cli.proc.kill()
            await cli.proc.wait()
        await pub.close()


@pytest.mark.parametrize("release", RELEASES)
async def test_listen_from_seq_replays_then_goes_live_in_order_without_duplicates(
    context: zmq.asyncio.Context, release: str
) -> None:
    pub = ZmqEventPublisher(
        replay_endpoint="tcp://127.0.0.1:0", topic="kv", release=release, context=context
    )
    await pub.start()
    assert pub.replay_endpoint is not None
    for i in range(3):
        pub.publish(_batch(i, release))

    # Keep publishing while the listener starts, so live batches overlap the replay.
    async def keep_publishing() -> None:
        while True:
            pub.publish(_batch(pub.next_seq, release))
            await asyncio.sleep(0.005)  # a publishing rate, not synchronisation

    publishing = asyncio.create_task(keep_publishing())
    cli = await _listen(
        "--endpoint", pub.endpoint, "--replay-endpoint", pub.replay_endpoint, "--topic", "kv",
        "--from-seq", "0",
    )  # fmt: skip
    try:
        lines = [await cli.line() for _ in range(3)]
        assert lines == [_expected_line(i, _batch(i, release), release) for i in range(3)]
        # Then live batches follow, strictly increasing (replay/live overlap deduplicated).
        while lines[-1]["seq"] < 3 or len(lines) < 8:
            lines.append(await cli.line())
        publishing.cancel()
        seqs = [line["seq"] for line in lines]
        assert seqs == sorted(set(seqs)) and seqs[:3] == [0, 1, 2]
        for line in lines:
            assert line == _expected_line(line["seq"], _batch(line["seq"], release), release)
        code, stderr = await cli.stop(signal.SIGTERM)
        assert (code, _errors(stderr)) == (0, [])
    finally:
        publishing.cancel()
        if cli.proc.returncode is None:
            cli.proc.kill()
            await cli.proc.wait()
        await pub.close()


async def test_listen_reports_undecodable_payload_and_keeps_going(
    context: zmq.asyncio.Context,
) -> None:
    pub = ZmqEventPublisher(context=context)
    await pub.start()
    cli = await _listen("--endpoint", pub.endpoint)
    try:
        await _join(cli, pub, "0.33.0")
        bad = pub.publish_payload(b"\xc1garbage")
        good = pub.publish(_batch(7, "0.33.0"))
        line = await cli.line()
        while line["seq"] < good:
            line = await cli.line()
        assert line == _expected_line(good, _batch(7, "0.33.0"), "0.33.0")
        code, stderr = await cli.stop(signal.SIGINT)
        assert code == 0
        assert f"seq {bad}: payload: expected a msgpack KVEventBatch" in stderr
    finally:
        if cli.proc.returncode is None:
            cli.proc.kill()
            await cli.proc.wait()
        await pub.close()


async def _run(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *_command(),
        "events",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE_S)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_listen_from_seq_without_replay_endpoint_is_bad_input() -> None:
    code, out, err = await _run("listen", "--endpoint", "tcp://127.0.0.1:1", "--from-seq", "0")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and "--from-seq needs --replay-endpoint" in err


async def test_listen_bad_endpoint_is_bad_input() -> None:
    code, out, err = await _run("listen", "--endpoint", "nonsense")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and "nonsense" in err


async def test_listen_on_a_silent_endpoint_says_what_it_waits_for() -> None:
    # It used to print nothing, forever, leaving a mistyped topic or endpoint a mystery.
    proc = await asyncio.create_subprocess_exec(
        *_command(),
        "events",
        "listen",
        "--endpoint",
        "tcp://127.0.0.1:9",
        "--topic",
        "kv",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        line = (await asyncio.wait_for(proc.stderr.readline(), DEADLINE_S)).decode()
        assert "waiting for batches from tcp://127.0.0.1:9 with topic 'kv'" in line
        assert "tcp://*:PORT" in line
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), DEADLINE_S) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_decode_prints_expected_json_for_every_fixture() -> None:
    all_scenarios = scenarios()
    files = [str(event_fixtures_dir() / s.version / f"{s.name}.msgpack") for s in all_scenarios]
    code, out, err = await _run("decode", *files)
    assert (code, err) == (0, "")
    assert [json.loads(line) for line in out.splitlines()] == [s.expected for s in all_scenarios]


async def test_decode_bad_file_exits_2_with_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(b"\x93\xcb\x00")
    good = event_fixtures_dir() / "0.33.0" / "chain.msgpack"
    code, out, err = await _run("decode", str(bad), str(good))
    assert code == 2
    assert len(out.splitlines()) == 1  # the good file is still printed
    assert err.count("\n") == 1 and "bad.msgpack" in err and "expected" in err


async def test_decode_missing_file_exits_2(tmp_path: Path) -> None:
    code, out, err = await _run("decode", str(tmp_path / "missing.msgpack"))
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and "missing.msgpack" in err


def _errors(stderr: str) -> list[str]:
    """stderr without the line saying what `listen` waits for."""
    waiting = "kvroute events: listen: waiting for"
    return [line for line in stderr.splitlines() if not line.startswith(waiting)]
