"""Settings: defaults, KVROUTE_ and AIBrix environment names, validation, README table."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvroute.core import LoadSource, PolicyName
from kvroute.errors import ConfigError
from kvroute.index import IndexLimits
from kvroute.routing import CostWeights
from kvroute.settings import Settings, load_settings, settings_env_names, settings_markdown_table
from tests.shared_fixtures import PROJECT_ROOT

START = "<!-- settings-table:start -->"
END = "<!-- settings-table:end -->"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith(("KVROUTE_", "AIBRIX_")):
            monkeypatch.delenv(name)


def test_every_field_has_a_description_and_a_default() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name
        assert not field.is_required(), name


def test_defaults_match_the_architecture_contract() -> None:
    s = Settings()
    assert s.policy == "kv_aware"
    assert (s.w_prefill, s.w_load) == (1.0, 0.1)
    assert (s.medium_weight_gpu, s.medium_weight_cpu, s.medium_weight_other) == (1.0, 0.8, 0.5)
    assert (s.imbalance_tokens, s.w_queue, s.prefill_tok_per_s) == (0, 1.0, 16_000.0)
    assert s.speculative_ttl_s == 2.0
    assert s.kv_event_sync_enabled is True
    assert s.use_remote_tokenizer is False
    assert s.local_tokenizer is False  # nothing local configured: remote tokenization


def test_component_defaults_are_the_settings_defaults() -> None:
    # Written once, in the component; Settings reads them (settings.py).
    s, limits, weights = Settings(), IndexLimits(), CostWeights()
    assert (s.max_blocks_per_source, s.max_blocks_total, s.indexed_group) == (
        limits.max_blocks_per_source,
        limits.max_blocks_total,
        limits.indexed_group,
    )
    assert s.speculative_ttl_s == limits.speculative_ttl_s
    assert (s.w_prefill, s.w_load, s.imbalance_tokens, s.w_queue) == (
        weights.w_prefill,
        weights.w_load,
        weights.imbalance_tokens,
        weights.w_queue,
    )
    assert {"GPU": s.medium_weight_gpu, "CPU": s.medium_weight_cpu} == weights.medium
    assert s.medium_weight_other == weights.other_medium


def test_policy_is_the_policy_name_enum(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().policy is PolicyName.KV_AWARE
    monkeypatch.setenv("KVROUTE_POLICY", "random")
    assert Settings().policy is PolicyName.RANDOM
    assert load_settings(policy=PolicyName.LEAST_LOADED).policy is PolicyName.LEAST_LOADED


def test_tail_check_defaults_to_five_seconds_and_zero_disables_it() -> None:
    assert Settings().tail_check_s == 5.0
    assert load_settings(tail_check_s=0).tail_check_s == 0.0
    with pytest.raises(ConfigError, match="tail_check_s"):
        load_settings(tail_check_s=-1)


def test_kvroute_prefixed_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVROUTE_PORT", "9123")
    monkeypatch.setenv("KVROUTE_POLICY", "round_robin")
    monkeypatch.setenv("KVROUTE_FLEET_FILE", "/etc/fleet.yaml")
    s = Settings()
    assert s.port == 9123
    assert s.policy == "round_robin"
    assert s.fleet_file == Path("/etc/fleet.yaml")


@pytest.mark.parametrize("env", ["AIBRIX_KV_EVENT_SYNC_ENABLED", "KVROUTE_KV_EVENT_SYNC_ENABLED"])
def test_kv_event_sync_is_read_from_aibrix_and_kvroute_names(
    monkeypatch: pytest.MonkeyPatch, env: str
) -> None:
    monkeypatch.setenv(env, "false")
    assert Settings().kv_event_sync_enabled is False


def test_aibrix_remote_tokenizer_overrides_a_local_tokenizer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KVROUTE_TOKENIZER_PATH", "/models/tokenizer.json")
    assert Settings().local_tokenizer is True
    monkeypatch.setenv("AIBRIX_USE_REMOTE_TOKENIZER", "true")
    s = Settings()
    assert s.use_remote_tokenizer is True
    assert s.local_tokenizer is False


def test_keyword_overrides_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIBRIX_KV_EVENT_SYNC_ENABLED", "false")
    assert load_settings(kv_event_sync_enabled=True).kv_event_sync_enabled is True


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"port": -1}, "port"),
        ({"policy": "fastest"}, "policy"),
        ({"w_load": -0.5}, "w_load"),
        ({"retry_backoff_min_s": 5.0, "retry_backoff_max_s": 1.0}, "retry_backoff_max_s"),
        ({"no_such_setting": 1}, "no_such_setting"),
    ],
)
def test_invalid_settings_raise_config_error_naming_the_field(
    overrides: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        load_settings(**overrides)


def test_invalid_environment_value_raises_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVROUTE_UNHEALTHY_AFTER", "often")
    with pytest.raises(ConfigError, match="unhealthy_after"):
        load_settings()


def test_settings_table_has_a_row_per_field_with_env_names_and_defaults() -> None:
    table = settings_markdown_table()
    rows = table.strip().splitlines()[2:]
    assert len(rows) == len(Settings.model_fields)
    for row, name in zip(rows, Settings.model_fields, strict=True):
        assert row.startswith(f"| `{name}` |")
        for env in settings_env_names(name):
            assert f"`{env}`" in row
    assert "`AIBRIX_KV_EVENT_SYNC_ENABLED`" in table
    assert "`AIBRIX_USE_REMOTE_TOKENIZER`" in table
    assert "| `policy` | `KVROUTE_POLICY` | `kv_aware` |" in table


def test_readme_settings_table_matches_settings() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert START in readme and END in readme, (
        "README.md needs the settings table between settings-table markers "
        "(print kvroute.settings.settings_markdown_table() to regenerate it)"
    )
    inside = readme.split(START, 1)[1].split(END, 1)[0]
    assert inside.strip() == settings_markdown_table().strip()


def test_a_fleet_file_and_kubernetes_discovery_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fleet_file and k8s_namespace"):
        load_settings(fleet_file=tmp_path / "fleet.yaml", k8s_namespace="ns")
    assert load_settings(k8s_namespace="ns").k8s_label_selector == "kvroute.io/engine=vllm"


def test_several_replicas_settings_defaults_and_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.scrape_interval_s <= 1.0  # engines' own load, fresh enough to route by
    # Replicas that all act on the same scraped report herd (docs/design.md §15).
    assert s.load_source is LoadSource.LOCAL
    assert s.shared_state_url is None  # sharing is opt-in
    monkeypatch.setenv("KVROUTE_LOAD_SOURCE", "blended")
    monkeypatch.setenv("KVROUTE_SHARED_STATE_URL", "redis://cache:6379/2")
    s = load_settings()
    assert (s.load_source, s.shared_state_url) == (LoadSource.BLENDED, "redis://cache:6379/2")
    with pytest.raises(ConfigError, match="load_source"):
        load_settings(load_source="gossip")
    with pytest.raises(ConfigError, match="shared_state_url: expected a redis://"):
        load_settings(shared_state_url="nats://127.0.0.1:4222")
    with pytest.raises(ConfigError, match="shared_state_ttl_s: expected > shared_state_interval"):
        load_settings(shared_state_interval_s=2.0, shared_state_ttl_s=1.0)
