"""Bad input never crashes the `/metrics` parser: random text gives floats or EngineError."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.errors import EngineError
from kvroute.fleet import parse_vllm_gauges, scan_vllm_gauges


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(max_size=40),
            st.sampled_from(
                [
                    "# TYPE vllm:a gauge",
                    "vllm:a 1",
                    'vllm:a{engine="0"} 2',
                    "vllm:a{",
                    "# TYPE vllm:a counter",
                    "vllm:a_total 3",
                    "vllm:b NaN",
                    "vllm:b +Inf",
                ]
            ),
        ),
        max_size=8,
    )
)
def test_parse_vllm_gauges_returns_floats_or_raises_engine_error(lines: list[str]) -> None:
    try:
        gauges = parse_vllm_gauges("\n".join(lines) + "\n")
    except EngineError:
        return
    assert all(k.startswith("vllm:") and isinstance(v, float) for k, v in gauges.items())


_NAMES = ["vllm:a", "vllm:a_b", "vllm:num_requests_running", "vllm:kv_cache_usage_perc", "proc_x"]
_SUFFIXES = ["", "_bucket", "_count", "_sum", "_total", "_created", "_b"]
_VALUES = ["1", "2.5", "NaN", "+Inf", "-3e2", "0"]


@st.composite
def _well_formed(draw: st.DrawFn) -> str:
    """Prometheus text: families (optionally declared) of samples with suffixes and labels."""
    lines: list[str] = []
    for _ in range(draw(st.integers(0, 5))):
        family = draw(st.sampled_from(_NAMES))
        kind = draw(st.sampled_from([None, "gauge", "counter", "histogram", "untyped"]))
        if kind is not None:
            lines.append(f"# HELP {family} some help")
            lines.append(f"# TYPE {family} {kind}")
        for _ in range(draw(st.integers(0, 4))):
            name = family + draw(st.sampled_from(_SUFFIXES))
            labels = draw(st.sampled_from(["", "{}", '{engine="0"}', '{le="1",engine="1"}']))
            sep = draw(st.sampled_from([" ", "\t"]))
            lines.append(f"{name}{labels}{sep}{draw(st.sampled_from(_VALUES))}")
    return "\n".join(lines) + "\n"


@settings(max_examples=300, deadline=None)
@given(_well_formed())
def test_scan_and_parse_agree_on_well_formed_text(text: str) -> None:
    assert scan_vllm_gauges(text) == parse_vllm_gauges(text)
