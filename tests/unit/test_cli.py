"""The `kvroute` command itself: `--version`, and help instead of an error when bare."""

from __future__ import annotations

import pytest

import kvroute
from kvroute.cli import main


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvroute {kvroute.__version__}"


def test_bare_kvroute_prints_help_and_succeeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kvroute") and "serve" in out and "sim" in out
