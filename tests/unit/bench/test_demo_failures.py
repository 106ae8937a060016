"""The demo keeps why a request failed, so a failing run's report says more than a count."""

from __future__ import annotations

import httpx

from kvroute.bench.demo import failure_text


def test_a_failed_response_is_reported_with_its_status_and_body() -> None:
    request = httpx.Request("POST", "http://gw/v1/chat/completions")
    response = httpx.Response(
        503, text='{"error": {"message": "no healthy engine"}}\n', request=request
    )
    text = failure_text(response)
    assert text.startswith("HTTP 503: ")
    assert "no healthy engine" in text and "\n" not in text


def test_an_exception_is_reported_by_type_and_message_and_stays_short() -> None:
    text = failure_text(None, httpx.ReadTimeout("timed out " + "x" * 1000))
    assert text.startswith("ReadTimeout: timed out")
    assert len(text) <= 300


def test_no_response_and_no_exception_still_says_something() -> None:
    assert failure_text(None) == "no response"
