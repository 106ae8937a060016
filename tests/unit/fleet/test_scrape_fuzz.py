"""Bad input never crashes the `/metrics` parser: random text gives floats or EngineError."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.errors import EngineError
from kvroute.fleet import parse_vllm_gauges


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
