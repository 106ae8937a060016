"""`kvroute bench hostile-client`: its flags, and one short run end to end (the measured runs
take a minute and are in README "Limits")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvroute.bench.hostile_client import HostileClientOptions, run
from kvroute.cli import main


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--hostile-kinds", "idle,nowhere"], "--hostile-kinds: expected some of"),
        (["--hostile-seconds", "0"], "expected > 0"),
        (["--normal-rate", "-1"], "expected > 0"),
        (["--idle-connections", "-1"], "expected >= 0"),
    ],
)
def test_bad_flags_exit_2_before_anything_starts(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "hostile-client", *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_short_run_serves_normal_requests_beside_every_hostile_client(tmp_path: Path) -> None:
    opts = HostileClientOptions(
        seconds=2.0,
        rate=10.0,
        huge_prompts=1,
        prompt_tokens=1_100_000,  # over the default max_prompt_tokens
        huge_bodies=2,
        body_mb=40,
        idle=20,
        slow=5,
        out_dir=tmp_path,
    )
    result = run(opts)
    for phase in ("quiet", "hostile"):
        assert result[phase]["statuses"] == {"200": 20}, result[phase]
        assert result[phase]["engines_ejected"] == []
    seen = result["hostile_clients"]
    assert seen["idle_opened"] >= 20 and seen["slow_opened"] >= 5, seen
    assert all(
        k.split("_")[-1] in {"400", "413", "ReadError", "WriteError", "RemoteProtocolError"}
        for k in seen
        if k.startswith(("huge_prompt", "body"))
    ), seen
    saved = json.loads((tmp_path / "hostile_client.json").read_text())
    assert saved["hostile"]["requests"] == 20
