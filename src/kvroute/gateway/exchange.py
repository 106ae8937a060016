"""One proxied request from arrival to its last byte: its id, times and routing facts; `finish`
observes the latency histograms once and writes the access log line."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Final

from starlette.requests import Request

from kvroute.metrics import Metrics

__all__ = ["REQUEST_ID_HEADER", "Exchange", "request_id"]

REQUEST_ID_HEADER: Final = "x-request-id"
_MAX_ID_CHARS: Final = 128  # a client's id longer than this is replaced, not logged
access_log = logging.getLogger("kvroute.access")


def request_id(request: Request) -> str:
    """The client's `x-request-id` when it is a sane token, else a new one; kept on
    `request.state.request_id` so error answers carry it too."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    rid = given if 0 < len(given) <= _MAX_ID_CHARS and given.isprintable() else uuid.uuid4().hex
    request.state.request_id = rid
    return rid


@dataclass(slots=True)
class Exchange:
    """Filled in as the request goes: handlers set the id and arrival, routing the model,
    policy and tokens, the proxy the engine and its times."""

    metrics: Metrics
    method: str
    path: str
    request_id: str
    log_access: bool = True
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None
    policy: str | None = None
    prompt_tokens: int | None = None
    matched_tokens: int | None = None
    engine: str | None = None
    upstream_started: float | None = None
    first_byte_s: float | None = None
    done: bool = False

    def sent_upstream(self, engine: str, matched_tokens: int) -> None:
        self.engine = engine
        self.matched_tokens = matched_tokens
        self.upstream_started = time.perf_counter()

    def first_byte(self) -> None:
        """The first chunk of a streamed answer went to the client."""
        if self.first_byte_s is None and self.engine is not None:
            self.first_byte_s = time.perf_counter() - self.started
            self.metrics.time_to_first_byte.labels(self.engine, self.policy or "").observe(
                self.first_byte_s
            )

    def finish(self, status: int, outcome: str) -> None:
        """The exchange ended with `status` to the client; `outcome` is the request counter's
        label (a status, `upstream_error`, `cancelled`, ...). Only the first call counts."""
        if self.done:
            return
        self.done = True
        now = time.perf_counter()
        latency = now - self.started
        engine = self.engine
        if engine is not None:
            policy = self.policy or ""
            self.metrics.request_duration.labels(engine, policy).observe(latency)
            if self.upstream_started is not None:
                self.metrics.upstream_duration.labels(engine).observe(now - self.upstream_started)
        if self.log_access and access_log.isEnabledFor(logging.INFO):
            ttfb = self.first_byte_s
            access_log.info(
                "%s %s %d",
                self.method,
                self.path,
                status,
                extra={
                    "request_id": self.request_id,
                    "model": self.model,
                    "engine": engine,
                    "policy": self.policy,
                    "status": status,
                    "outcome": outcome,
                    "prompt_tokens": self.prompt_tokens,
                    "matched_tokens": self.matched_tokens,
                    "latency_ms": round(latency * 1000, 3),
                    "ttfb_ms": None if ttfb is None else round(ttfb * 1000, 3),
                },
            )
