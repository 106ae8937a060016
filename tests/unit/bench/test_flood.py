"""`kvroute bench flood`: its flags (the runs themselves are measured by hand, README "Limits";
they take a minute)."""

from __future__ import annotations

import pytest

from kvroute.cli import main


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--flood-modes", "limits,nowhere"], "--flood-modes: expected some of"),
        (["--flood-seconds", "0"], "expected > 0"),
        (["--route-rate", "-1"], "expected > 0"),
        (["--flood-blocks-per-s", "0"], "expected > 0"),
        (["--hostile-sources", "0"], "--hostile-sources: expected >= 1"),
    ],
)
def test_bad_flags_exit_2_before_anything_starts(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "flood", *flags]) == 2
    assert message in capsys.readouterr().err
