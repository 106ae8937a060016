"""The vllm-router peer of `kvroute bench trace --vs vllm-router`: its command line per policy,
finding it in a venv, and the one-line exit 2 when it is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvroute.bench.vllm_router import (
    PeerMissing,
    RouterWorker,
    VllmRouterPeer,
    find_vllm_router,
    peer_run_name,
    router_command,
)
from kvroute.cli import main

PEER = VllmRouterPeer(python=Path("/venv/bin/python"), version="0.1.17")
WORKERS = [
    RouterWorker("http://127.0.0.1:8001", ("tcp://127.0.0.1:5557",), ("tcp://127.0.0.1:5558",)),
    RouterWorker(
        "http://127.0.0.1:8002",
        ("tcp://127.0.0.1:5567", "tcp://127.0.0.1:5568"),  # two DP ranks, in rank order
        ("tcp://127.0.0.1:5577", "tcp://127.0.0.1:5578"),
    ),
]


def _flag_values(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == flag]


def _command(policy: str, workers: list[RouterWorker] = WORKERS) -> list[str]:
    return router_command(
        PEER, policy, workers, model="sim-llama-8b", block_size=16, port=31000, metrics_port=31001
    )


def test_kv_aware_gets_every_workers_event_and_replay_endpoints() -> None:
    cmd = _command("kv_aware")
    assert cmd[:3] == ["/venv/bin/python", "-m", "vllm_router.launch_router"]
    assert _flag_values(cmd, "--policy") == ["kv_aware"]
    i = cmd.index("--worker-urls")
    assert cmd[i + 1 : i + 3] == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    assert _flag_values(cmd, "--kv-event-source") == [
        "http://127.0.0.1:8001=tcp://127.0.0.1:5557",
        "http://127.0.0.1:8002=tcp://127.0.0.1:5567,tcp://127.0.0.1:5568",
    ]
    assert _flag_values(cmd, "--kv-event-replay-source") == [
        "http://127.0.0.1:8001=tcp://127.0.0.1:5558",
        "http://127.0.0.1:8002=tcp://127.0.0.1:5577,tcp://127.0.0.1:5578",
    ]
    assert _flag_values(cmd, "--kv-event-block-size") == ["16"]
    assert _flag_values(cmd, "--kv-event-model") == ["sim-llama-8b"]
    assert _flag_values(cmd, "--port") == ["31000"]
    assert _flag_values(cmd, "--prometheus-port") == ["31001"]  # never its fixed default 29000


def test_a_worker_without_replay_gets_no_replay_source() -> None:
    cmd = _command("kv_aware", [RouterWorker("http://h:1", ("tcp://h:2",))])
    assert _flag_values(cmd, "--kv-event-source") == ["http://h:1=tcp://h:2"]
    assert "--kv-event-replay-source" not in cmd


@pytest.mark.parametrize("policy", ["cache_aware", "round_robin"])
def test_a_policy_without_events_takes_no_event_flags(policy: str) -> None:
    cmd = _command(policy)
    assert _flag_values(cmd, "--policy") == [policy]
    assert not [arg for arg in cmd if arg.startswith("--kv-event")]


@pytest.mark.parametrize(
    ("policy", "workers", "message"),
    [
        ("power_of_two", WORKERS, "expected one of kv_aware, cache_aware, round_robin"),
        ("kv_aware", [], "at least one worker"),
        ("kv_aware", [RouterWorker("http://h:1", ())], "has no event endpoint"),
    ],
)
def test_bad_commands_are_refused(policy: str, workers: list[RouterWorker], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _command(policy, workers)


def test_run_names_say_whose_policy() -> None:
    assert peer_run_name("kv_aware") == "vllm-router:kv_aware"


def test_found_in_a_venv_with_its_version(tmp_path: Path) -> None:
    site = tmp_path / "lib" / "python3.11" / "site-packages"
    (site / "vllm_router").mkdir(parents=True)
    (site / "vllm_router" / "launch_router.py").write_text("")
    (site / "vllm_router-0.1.17.dist-info").mkdir()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text("")
    peer = find_vllm_router(tmp_path)
    assert peer.python == tmp_path.absolute() / "bin" / "python"
    assert peer.version == "0.1.17"


def test_missing_says_to_run_make_bench_peers(tmp_path: Path) -> None:
    with pytest.raises(PeerMissing, match=r"vllm-router==0\.1\.17.*make bench-peers"):
        find_vllm_router(tmp_path)


def test_trace_vs_vllm_router_without_it_exits_2_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}\n')
    args = ["bench", "trace", str(trace), "--vs", "vllm-router", "--peers-venv", str(tmp_path)]
    assert main([*args, "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("kvroute bench trace: --vs vllm-router: vllm-router (vllm-router==")
    assert "run `make bench-peers` to install it" in err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_peers_venv_without_vs_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "trace", "FILE", "--peers-venv", str(tmp_path)]) == 2
    assert "--peers-venv goes with --vs vllm-router" in capsys.readouterr().err
