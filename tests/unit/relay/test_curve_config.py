"""CURVE configuration, parsed field by field: key files, the fleet file's `curve_server_key`,
the discovery annotation, the gateway's settings, and `kvroute keys generate`."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
import zmq

from kvroute.cli import main
from kvroute.errors import ConfigError
from kvroute.events import (
    check_curve_key,
    load_curve_key_pair,
    load_curve_public_key,
    write_curve_key_pair,
)
from kvroute.fleet import parse_fleet
from kvroute.fleet.kubernetes import engine_from_pod
from kvroute.gateway.app import build_gateway
from kvroute.metrics import Metrics
from kvroute.relay import AllowList, RelayCounters
from kvroute.settings import load_settings
from kvroute.upstream import HttpxEngineClient
from tests.engine_clients import engine_client

KEY = zmq.curve_keypair()[0].decode()


def _engine(**fields: object) -> dict[str, object]:
    return {"name": "e", "model": "m", "url": "http://h:8000", "events": "tcp://h:15557", **fields}


def test_a_fleet_entrys_curve_server_key_reaches_every_source() -> None:
    (spec,) = parse_fleet({"engines": [_engine(curve_server_key=KEY, dp_ranks=[0, 1])]})
    assert spec.curve_server_key == KEY
    assert [s.curve_server_key for s in spec.sources()] == [KEY, KEY]
    (plain,) = parse_fleet({"engines": [_engine()]})
    assert plain.curve_server_key is None and plain.sources()[0].curve_server_key is None


@pytest.mark.parametrize(
    "bad",
    ["short", KEY[:-1] + " ", KEY + "x", 12, KEY[:-1] + "~", ""],
    # Named, not shown: the key is made at import, so its ids would differ between processes.
    ids=["short", "space", "long", "int", "not-z85", "empty"],
)
def test_a_malformed_curve_server_key_is_a_config_error_naming_the_field(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"engine 'e' \(#0\): field 'curve_server_key'"):
        parse_fleet({"engines": [_engine(curve_server_key=bad)]})


def test_the_discovery_annotation_sets_the_server_key() -> None:
    pod = {
        "metadata": {
            "name": "p",
            "namespace": "ns",
            "annotations": {"kvroute.io/model": "m", "kvroute.io/curve-server-key": KEY},
        },
        "status": {"podIP": "10.0.0.5"},
    }
    assert engine_from_pod(pod).curve_server_key == KEY
    pod["metadata"]["annotations"]["kvroute.io/curve-server-key"] = "nope"  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"^pod ns/p: .*curve_server_key"):
        engine_from_pod(pod)


def test_check_curve_key_takes_40_z85_characters_only() -> None:
    assert check_curve_key(KEY, "k") == KEY.encode()
    assert check_curve_key(KEY.encode(), "k") == KEY.encode()
    for bad in ("a" * 39, "é" * 40, "~" * 40, None):
        with pytest.raises(ConfigError, match=r"^k: expected"):
            check_curve_key(bad, "k")


def test_key_files_are_written_in_zmq_auth_format_and_the_secret_is_private(
    tmp_path: Path,
) -> None:
    public, secret = write_curve_key_pair(tmp_path / "keys", "relay")
    assert (public.name, secret.name) == ("relay.key", "relay.key_secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pair = load_curve_key_pair(secret, public)
    assert zmq.auth.load_certificate(public) == (pair.public, None)
    assert load_curve_public_key(secret) == load_curve_public_key(public) == pair.public
    assert "secret=<hidden>" in repr(pair) and pair.secret.decode() not in repr(pair)
    with pytest.raises(ConfigError, match="exists: not overwritten"):
        write_curve_key_pair(tmp_path / "keys", "relay")
    with pytest.raises(ConfigError, match="plain file name"):
        write_curve_key_pair(tmp_path, "../x")


def test_a_key_pair_that_does_not_belong_together_is_a_config_error(tmp_path: Path) -> None:
    public_a, secret_a = write_curve_key_pair(tmp_path, "a")
    public_b, _ = write_curve_key_pair(tmp_path, "b")
    with pytest.raises(ConfigError, match="expected the key pair of"):
        load_curve_key_pair(secret_a, public_b)
    with pytest.raises(ConfigError, match="a public key file only"):
        load_curve_key_pair(public_a)
    with pytest.raises(ConfigError, match="cannot read"):
        load_curve_key_pair(tmp_path / "missing.key_secret")
    forged = tmp_path / "forged.key_secret"
    text = secret_a.read_text().replace(
        load_curve_public_key(public_a).decode(), load_curve_public_key(public_b).decode()
    )
    forged.write_text(text)
    with pytest.raises(ConfigError, match="does not belong to the secret key"):
        load_curve_key_pair(forged)


def test_the_allow_list_skips_files_that_are_not_keys_and_rereads_on_change(
    tmp_path: Path,
) -> None:
    counters = RelayCounters()
    public, _ = write_curve_key_pair(tmp_path / "keys", "gw")
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / "gw.key").write_bytes(public.read_bytes())
    (allow / "junk.key").write_text("nothing here")
    (allow / "ignored.txt").write_text("not a *.key file")
    allowed = AllowList(allow, counters)
    key = load_curve_public_key(public)
    assert allowed.keys == {key} and counters.allow_list_keys == 1
    assert allowed.callback("", key) and not allowed.callback("", KEY.encode())
    assert not allowed.reload_if_changed()  # nothing changed
    (allow / "gw.key").unlink()
    assert allowed.reload_if_changed() and allowed.keys == frozenset()
    with pytest.raises(ConfigError, match="allow-list"):
        AllowList(tmp_path / "none", counters)


def test_gateway_key_files_are_both_or_neither(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="curve_secret_key_file and curve_public_key_file"):
        load_settings(curve_secret_key_file=tmp_path / "x.key_secret")


@pytest.fixture
async def client() -> AsyncIterator[HttpxEngineClient]:
    async with engine_client(timeout_s=1.0) as c:
        yield c


async def test_a_fleet_naming_a_server_key_needs_the_gateways_key_pair(
    tmp_path: Path, client: HttpxEngineClient
) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"engines": [_engine(curve_server_key=KEY)]}))
    with pytest.raises(ConfigError, match=r"\['e'\] have a curve_server_key.*no CURVE key pair"):
        build_gateway(load_settings(fleet_file=fleet), client, Metrics())
    assert main(["serve", "--fleet", str(fleet), "--port", "0"]) == 2  # before binding a port
    public, secret = write_curve_key_pair(tmp_path, "gateway")
    other, _ = write_curve_key_pair(tmp_path, "other")
    with pytest.raises(ConfigError, match="curve_secret_key_file"):
        build_gateway(
            load_settings(
                fleet_file=fleet, curve_secret_key_file=secret, curve_public_key_file=other
            ),
            client,
            Metrics(),
        )
    gateway = build_gateway(
        load_settings(fleet_file=fleet, curve_secret_key_file=secret, curve_public_key_file=public),
        client,
        Metrics(),
    )
    assert gateway.subscribers is not None
    await gateway.close()


def test_keys_generate_writes_a_pair_and_prints_the_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "generate", "--out", str(tmp_path), "--name", "relay"]) == 0
    printed = capsys.readouterr().out.strip()
    pair = load_curve_key_pair(tmp_path / "relay.key_secret", tmp_path / "relay.key")
    assert printed == pair.public.decode()
    assert stat.S_IMODE((tmp_path / "relay.key_secret").stat().st_mode) == 0o600
    assert main(["keys", "generate", "--out", str(tmp_path), "--name", "relay"]) == 2
    assert "not overwritten" in capsys.readouterr().err


def test_relay_cli_refuses_a_bad_key_file_and_half_a_replay_pair(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["relay", "--allow-dir", str(tmp_path)]
    assert main([*base, "--secret-key-file", str(tmp_path / "none")]) == 2
    assert "cannot read" in capsys.readouterr().err
    _, secret = write_curve_key_pair(tmp_path, "relay")
    assert main([*base, "--secret-key-file", str(secret), "--bind-replay", "tcp://*:1"]) == 2
    assert "both or neither" in capsys.readouterr().err


def test_sim_refuses_a_curve_key_file_that_is_not_a_key_pair(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    public, _ = write_curve_key_pair(tmp_path, "relay")
    assert main(["sim", "--curve-secret-key-file", str(public)]) == 2
    assert "--curve-secret-key-file" in capsys.readouterr().err
