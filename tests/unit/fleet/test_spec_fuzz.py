"""Bad input never crashes the fleet file parser: random documents give specs or ConfigError."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.errors import ConfigError
from kvroute.fleet import EngineSpec, parse_fleet

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.sampled_from(["tcp://h:5557", "http://h:8000", "inproc://x", "ipc:///x", "tcp://*:1"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_fields = st.sampled_from(
    ["name", "model", "url", "events", "replay", "topic", "dp_ranks", "lora", "extra"]
)
_valid_engines = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["a", "b", "c"]),
        "model": st.sampled_from(["m", "n"]),
        "url": st.sampled_from(["http://h:8000", "https://x/v", "http://[::1]:1"]),
    },
    optional={
        "events": st.sampled_from(["tcp://h:5557", "tcp://g:7000", "inproc://kv", "ipc:///k"]),
        "replay": st.sampled_from(["tcp://h:5558", "tcp://g:7100", None]),
        "topic": st.sampled_from(["", "kv"]),
        "dp_ranks": st.lists(st.integers(0, 3), min_size=1, max_size=3),
        "lora": st.lists(st.sampled_from(["x", "y", "m"]), max_size=2),
    },
)


@st.composite
def _engines(draw: st.DrawFn) -> dict[Any, Any]:
    """Mostly valid engines with some fields replaced by anything at all."""
    engine: dict[Any, Any] = draw(_valid_engines)
    for field in draw(st.lists(_fields, max_size=2)):
        engine[field] = draw(_values)
    return engine


@settings(max_examples=250, deadline=None)
@given(st.one_of(_values, st.fixed_dictionaries({"engines": st.lists(_engines(), max_size=3)})))
def test_parse_fleet_returns_specs_or_raises_config_error(document: Any) -> None:
    try:
        specs = parse_fleet(document, origin="fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml: ")
        return
    assert len({s.name for s in specs}) == len(specs)
    assert all(isinstance(s, EngineSpec) for s in specs)
    for spec in specs:
        spec.sources()  # every accepted spec can be turned into sources
