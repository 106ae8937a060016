"""The fleet file (docs/architecture.md): parsing, defaults, rank sources, clear errors."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvroute.core import SourceSpec
from kvroute.errors import ConfigError
from kvroute.fleet import EngineSpec, load_fleet_file, offset_endpoint, parse_fleet

EXAMPLE = """\
engines:
  - name: engine-a                    # unique
    model: meta-llama/Llama-3.1-8B    # served model name
    url: http://10.0.0.5:8000         # OpenAI-compatible base URL
    events: tcp://10.0.0.5:5557       # PUB endpoint of DP rank 0 (connect address)
    replay: tcp://10.0.0.5:6557       # ROUTER endpoint of DP rank 0, optional
    topic: kv                         # optional, default ""
    dp_ranks: [0, 1]                  # global ranks; rank r uses port + r, as vLLM does
    lora: [sql-adapter]               # optional adapters served
  - name: engine-b
    model: meta-llama/Llama-3.1-8B
    url: http://10.0.0.6:8000/
    events: tcp://10.0.0.6:5557
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_architecture_example_parses(tmp_path: Path) -> None:
    a, b = load_fleet_file(_write(tmp_path, EXAMPLE))
    assert a == EngineSpec(
        name="engine-a",
        model="meta-llama/Llama-3.1-8B",
        url="http://10.0.0.5:8000",
        events="tcp://10.0.0.5:5557",
        replay="tcp://10.0.0.5:6557",
        topic="kv",
        dp_ranks=(0, 1),
        lora=("sql-adapter",),
    )
    # defaults, and a trailing slash on the URL is dropped
    assert b == EngineSpec(
        name="engine-b",
        model="meta-llama/Llama-3.1-8B",
        url="http://10.0.0.6:8000",
        events="tcp://10.0.0.6:5557",
    )
    assert (b.replay, b.topic, b.dp_ranks, b.lora) == (None, "", (0,), ())


def test_sources_offset_ports_by_dp_rank_as_vllm_does(tmp_path: Path) -> None:
    a, b = load_fleet_file(_write(tmp_path, EXAMPLE))
    assert a.sources() == [
        SourceSpec(
            engine="engine-a",
            model="meta-llama/Llama-3.1-8B",
            endpoint="tcp://10.0.0.5:5557",
            replay_endpoint="tcp://10.0.0.5:6557",
            topic="kv",
            rank=0,
        ),
        SourceSpec(
            engine="engine-a",
            model="meta-llama/Llama-3.1-8B",
            endpoint="tcp://10.0.0.5:5558",
            replay_endpoint="tcp://10.0.0.5:6558",
            topic="kv",
            rank=1,
        ),
    ]
    assert [s.source for s in a.sources()] == ["engine-a/0", "engine-a/1"]
    assert [(s.source, s.endpoint, s.replay_endpoint) for s in b.sources()] == [
        ("engine-b/0", "tcp://10.0.0.6:5557", None)
    ]


def test_global_dp_ranks_offset_from_the_rank_zero_port() -> None:
    # multi-node DP: the second node serves global ranks 8..9 on 5565..5566
    spec = EngineSpec("e", "m", "http://h:1", "tcp://node2:5557", dp_ranks=(8, 9))
    assert [(s.source, s.endpoint) for s in spec.sources()] == [
        ("e/8", "tcp://node2:5565"),
        ("e/9", "tcp://node2:5566"),
    ]


def test_engine_without_events_has_no_sources() -> None:
    assert EngineSpec("e", "m", "http://h:1", None).sources() == []


def test_offset_endpoint_rules() -> None:
    assert offset_endpoint("tcp://h:5557", 0) == "tcp://h:5557"
    assert offset_endpoint("tcp://[::1]:5557", 2) == "tcp://[::1]:5559"
    assert offset_endpoint("inproc://kv", 0) == "inproc://kv"
    assert offset_endpoint("inproc://kv", 3) == "inproc://kv_dp3"
    assert offset_endpoint("ipc:///tmp/kv", 0) == "ipc:///tmp/kv"
    with pytest.raises(ConfigError, match="expected a tcp:// or inproc:// endpoint to offset"):
        offset_endpoint("ipc:///tmp/kv", 1)


def test_empty_fleet_is_allowed() -> None:
    assert parse_fleet({"engines": []}) == []


def _engine(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "engine-a", "model": "m", "url": "http://h:8000"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not _MISSING}


_MISSING = object()


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        (_engine(gpu="a100"), "engine 'engine-a' (#0): unknown field(s) ['gpu']"),
        (_engine(url=_MISSING), "engine 'engine-a' (#0): field 'url': required, but missing"),
        (_engine(name=""), "engine #0: field 'name': expected a non-empty string, got str ''"),
        (_engine(name=5), "engine #0: field 'name': expected a non-empty string, got int 5"),
        (_engine(model=None), "field 'model': expected a non-empty string, got NoneType None"),
        (_engine(url="ftp://h:21"), "field 'url': expected an http(s)://host[:port] base URL"),
        (_engine(url="http://"), "field 'url': expected an http(s)://host[:port] base URL"),
        (_engine(url="http://h:99999"), "field 'url': expected an http(s)://host[:port]"),
        (_engine(url="http://h:8000/?a=1"), "field 'url': expected a base URL without query"),
        # The OpenAI SDK's base_url habit; it used to eject every engine (/v1/health is 404).
        (
            _engine(url="http://h:8000/v1/"),
            "field 'url': expected the engine's base URL without /v1 (write 'http://h:8000')",
        ),
        (_engine(events="tcp://*:5557"), "field 'events': expected a connect address tcp://host"),
        (_engine(events="tcp://h"), "field 'events': expected a connect address"),
        (_engine(events="h:5557"), "field 'events': expected a connect address"),
        (_engine(events="tcp://h:0"), "field 'events': expected a tcp port in 1..65535"),
        (
            _engine(events="tcp://h:65535", dp_ranks=[0, 1]),
            "field 'events': expected a tcp port in 1..65534 (+ DP rank), got str 'tcp://h:65535'",
        ),
        (_engine(replay="tcp://h:x"), "field 'replay': expected a connect address"),
        (
            _engine(events="ipc:///tmp/kv", dp_ranks=[0, 1]),
            "field 'events': expected tcp:// or inproc:// (ipc:// cannot be offset by DP rank)",
        ),
        (
            _engine(dp_ranks="0,1"),
            "field 'dp_ranks': expected a non-empty list of ints >= 0, got str",
        ),
        (_engine(dp_ranks=[]), "field 'dp_ranks': expected a non-empty list of ints >= 0"),
        (
            _engine(dp_ranks=[0, "1"]),
            "field 'dp_ranks': expected a non-empty list of ints >= 0, got str '1'",
        ),
        (
            _engine(dp_ranks=[0, True]),
            "field 'dp_ranks': expected a non-empty list of ints >= 0, got bool",
        ),
        (
            _engine(dp_ranks=[-1]),
            "field 'dp_ranks': expected a non-empty list of ints >= 0, got int -1",
        ),
        (_engine(dp_ranks=[1.5]), "got float 1.5"),
        (_engine(dp_ranks=[0, 0]), "field 'dp_ranks': expected distinct ranks"),
        (_engine(lora="sql"), "field 'lora': expected a list of adapter names, got str 'sql'"),
        (
            _engine(lora=["a", 3]),
            "field 'lora': expected a list of non-empty adapter names, got int 3",
        ),
        (_engine(lora=["a", "a"]), "field 'lora': expected distinct adapter names"),
        (_engine(lora=["m"]), "field 'lora': expected adapter names other than the model's own"),
        (_engine(topic=7), "field 'topic': expected a string, got int 7"),
    ],
)
def test_invalid_engine_fields_name_file_engine_field_and_what_was_expected(
    tmp_path: Path, engine: dict[str, Any], message: str
) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"engines": [engine]}))
    with pytest.raises(ConfigError) as info:
        load_fleet_file(path)
    text = str(info.value)
    assert text.startswith(f"{path}: "), text
    assert message in text, text


def test_duplicate_names_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"engines": [_engine(), _engine(url="http://other:1")]}))
    with pytest.raises(
        ConfigError,
        match=r"engine 'engine-a' \(#1\): field 'name': expected a unique name, got a duplicate of "
        r"engine #0",
    ):
        load_fleet_file(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- name: a\n", "expected a mapping with key 'engines', got list"),
        ("engines: []\nrouters: []\n", "unknown top-level key(s) ['routers']"),
        ("engines:\n  name: a\n", "field 'engines': expected a list, got dict"),
        ("", "expected a mapping with key 'engines', got NoneType"),
        ("engines:\n  - just-a-name\n", "engine #0: expected a mapping of fields, got str"),
        ("engines: [\n", "expected YAML, got a syntax error"),
    ],
)
def test_invalid_documents(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_fleet_file(path)


def test_dp_rank_ports_that_collide_with_the_replay_port_are_rejected() -> None:
    # vLLM's defaults (5557, 5558) with two DP ranks: rank 1's PUB would sit on rank 0's ROUTER
    engine = _engine(events="tcp://h:5557", replay="tcp://h:5558", dp_ranks=[0, 1])
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "engine 'engine-a' (#0): field 'replay': expected endpoints no other socket uses, "
            "got tcp://h:5558 for DP rank 0, also the 'events' endpoint of engine 'engine-a'"
        ),
    ):
        parse_fleet({"engines": [engine]})


def test_two_engines_on_one_endpoint_are_rejected() -> None:
    a = _engine(events="tcp://h:5557")
    b = {**_engine(events="tcp://h:5557"), "name": "engine-b"}
    with pytest.raises(ConfigError, match="also the 'events' endpoint of engine 'engine-a'"):
        parse_fleet({"engines": [a, b]})
    b["events"] = "tcp://other-host:5557"
    assert len(parse_fleet({"engines": [a, b]})) == 2


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'nope.yaml'}: cannot read")):
        load_fleet_file(tmp_path / "nope.yaml")
