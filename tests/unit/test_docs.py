"""README keeps up with the code: the two commands first, every endpoint, metric and label."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from starlette.routing import Route

from kvroute.core import DropReason, ReplayOutcome, ResetCause
from kvroute.gateway import create_app
from kvroute.metrics import Metrics
from kvroute.settings import load_settings

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def test_readme_opens_with_the_two_commands() -> None:
    text = _readme()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert first_block is not None
    before = text[: first_block.start()].strip()
    assert before.startswith("# ") and "\n" not in before, "only the title precedes the commands"
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make demo", "make test"]


def test_every_gateway_endpoint_is_in_the_readme() -> None:
    app = create_app(load_settings())
    text = _readme()
    for route in app.routes:
        assert isinstance(route, Route)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            assert f"`{method} {route.path}`" in text, f"{method} {route.path}"


def test_every_metric_is_in_the_readme() -> None:
    text = _readme()
    for family in Metrics().registry.collect():
        assert re.search(rf"`{family.name}(_total)?[{{`]", text), family.name


@pytest.mark.parametrize("label", [*DropReason, *ResetCause, *ReplayOutcome], ids=str)
def test_every_reason_cause_and_outcome_label_is_in_the_readme(label: str) -> None:
    assert f"`{label}`" in _readme()
