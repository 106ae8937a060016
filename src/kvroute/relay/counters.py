"""What the relay counts (plain ints, read at scrape time and by tests): forwarded messages,
handshakes per socket and outcome, replays per outcome, allow-list reloads."""

from __future__ import annotations

import collections
import enum

__all__ = ["HandshakeOutcome", "RelayCounters", "RelayReplayOutcome"]


class HandshakeOutcome(enum.StrEnum):
    """How a client's CURVE handshake with a relay socket ended: the `outcome` label."""

    OK = "ok"
    NO_KEY = "no_key"  # the client speaks plain ZeroMQ (a mechanism mismatch)
    UNKNOWN_KEY = "unknown_key"  # the client's public key is not in the allow-list (ZAP: 400)
    WRONG_SERVER_KEY = "wrong_server_key"  # the client holds another server key (crypto error)
    # the client hung up before its handshake ended: typically one without a key that saw the
    # mechanism mismatch before the relay did (which of the two sees it first is a race)
    ABORTED = "aborted"
    OTHER = "other"  # any other handshake failure (protocol error, ZAP unavailable)


class RelayReplayOutcome(enum.StrEnum):
    """How one replay request through the relay ended: the `outcome` label."""

    OK = "ok"  # the engine's end marker reached the client
    REFUSED = "refused"  # too many replays outstanding: no reply (the client times out)
    BAD_REQUEST = "bad_request"  # not [identity, "", seq8]: no reply, as vLLM does
    TIMEOUT = "timeout"  # the engine did not finish within the relay's deadline
    CLIENT_GONE = "client_gone"  # the client left, or stopped reading (its queue was full)


class RelayCounters:
    """Plain counters of one relay; `kvroute.metrics.RelayMetrics` exports them."""

    __slots__ = (
        "allow_list_keys",
        "allow_list_reloads",
        "engine_disconnects",
        "forwarded_bytes",
        "forwarded_messages",
        "handshakes",
        "replay_batches",
        "replays",
        "unforwarded_messages",
    )

    def __init__(self) -> None:
        self.forwarded_messages = 0
        self.forwarded_bytes = 0
        self.unforwarded_messages = 0  # arrived while the relay's PUB was closed (engine away)
        self.engine_disconnects = 0
        # (socket: "events" | "replay", outcome)
        self.handshakes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.replays: collections.Counter[str] = collections.Counter()  # outcome
        self.replay_batches = 0  # reply messages passed to clients (end markers included)
        self.allow_list_keys = 0
        self.allow_list_reloads: collections.Counter[str] = collections.Counter()  # outcome

    def denied(self, socket: str | None = None) -> int:
        """Handshakes the relay refused, on one socket or both (`aborted` ones not included:
        a client that hangs up early is not told from one the relay refused)."""
        return sum(
            n
            for (sock, outcome), n in self.handshakes.items()
            if outcome not in (HandshakeOutcome.OK, HandshakeOutcome.ABORTED)
            and (socket is None or sock == socket)
        )
