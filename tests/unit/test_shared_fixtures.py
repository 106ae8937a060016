"""The one helper tests reach the shared fixtures through: KVROUTE_SHARED, failing loudly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.shared_fixtures import event_fixtures_dir, shared_dir


@pytest.fixture
def fresh_shared_dir() -> Iterator[None]:
    shared_dir.cache_clear()
    yield
    shared_dir.cache_clear()  # later tests resolve it again from the real environment


def test_a_missing_shared_folder_fails_loudly_not_as_a_skip(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_shared_dir: None
) -> None:
    monkeypatch.setenv("KVROUTE_SHARED", str(tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match="set KVROUTE_SHARED"):
        event_fixtures_dir()


def test_kvroute_shared_names_the_folder(
    monkeypatch: pytest.MonkeyPatch, fresh_shared_dir: None
) -> None:
    real = shared_dir()
    shared_dir.cache_clear()
    monkeypatch.setenv("KVROUTE_SHARED", str(real))
    assert event_fixtures_dir() == real / "fixtures" / "vllm_events"
