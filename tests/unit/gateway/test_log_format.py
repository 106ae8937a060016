"""Structured log lines: key=value and JSON, fields passed with `extra`."""

from __future__ import annotations

import json
import logging

from kvroute.gateway.log_format import JsonFormatter, KeyValueFormatter


def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("kvroute.gateway", logging.INFO, __file__, 1, msg, None, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_key_value_lines_quote_values_with_spaces() -> None:
    line = KeyValueFormatter().format(_record("fleet changed", engine="engine-a", added=["x"]))
    assert "level=info" in line
    assert "logger=kvroute.gateway" in line
    assert 'msg="fleet changed"' in line
    assert "engine=engine-a" in line
    assert 'added="[\\"x\\"]"' in line


def test_json_lines_carry_the_same_fields() -> None:
    data = json.loads(JsonFormatter().format(_record("started", engines=4)))
    assert data["msg"] == "started"
    assert data["engines"] == 4
    assert data["level"] == "info"
    assert data["ts"].endswith("Z")
