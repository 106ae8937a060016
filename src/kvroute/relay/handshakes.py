"""Counts how the CURVE handshakes on a relay socket end, per reason, from its ZeroMQ monitor
(a client with no key, an unknown key or another server key never gets a message)."""

# libzmq reports a handshake's outcome without saying which connection it belongs to, but
# ACCEPTED and DISCONNECTED carry the connection's descriptor: an outcome is taken to be that of
# the oldest connection still waiting for one (handshakes end in about the order they start), and
# a connection that goes away with none is counted `aborted`. So `aborted` is approximate when
# handshakes overlap (a short-lived client may be counted); the refusals are counted exactly.

from __future__ import annotations

import logging
from typing import Final

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvroute.relay.counters import HandshakeOutcome, RelayCounters

__all__ = ["HANDSHAKE_EVENTS", "handshake_outcome", "watch_handshakes"]

log = logging.getLogger("kvroute.relay")

HANDSHAKE_EVENTS: Final = (
    zmq.EVENT_ACCEPTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def handshake_outcome(event: int, value: int) -> HandshakeOutcome | None:
    """The outcome a monitor event reports, or None for other events."""
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return HandshakeOutcome.OK
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return HandshakeOutcome.UNKNOWN_KEY  # the ZAP handler said no (status 400)
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return HandshakeOutcome.NO_KEY
        if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            return HandshakeOutcome.WRONG_SERVER_KEY
        return HandshakeOutcome.OTHER
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return HandshakeOutcome.ABORTED  # the peer closed mid-handshake (libzmq: no detail)
    return None


async def watch_handshakes(
    monitor: zmq.asyncio.Socket, socket_name: str, counters: RelayCounters
) -> None:
    """Count every handshake `monitor` reports until cancelled (or the monitor closes)."""
    waiting: dict[int, None] = {}  # descriptors of accepted connections without an outcome
    while True:
        try:
            frames = await monitor.recv_multipart()
        except zmq.ZMQError:
            return
        message = parse_monitor_message(frames)
        event, value = int(message["event"]), int(message["value"])
        if event == zmq.EVENT_ACCEPTED:
            waiting[value] = None
            continue
        if event == zmq.EVENT_DISCONNECTED:
            if waiting.pop(value, False) is None:
                _count(counters, socket_name, HandshakeOutcome.ABORTED, message["endpoint"])
            continue
        outcome = handshake_outcome(event, value)
        if outcome is None:
            continue
        if waiting:
            del waiting[next(iter(waiting))]
        _count(counters, socket_name, outcome, message["endpoint"])


def _count(
    counters: RelayCounters, socket_name: str, outcome: HandshakeOutcome, endpoint: bytes
) -> None:
    counters.handshakes[(socket_name, outcome.value)] += 1
    if outcome is not HandshakeOutcome.OK:
        log.info(
            "relay: client handshake refused",
            extra={
                "socket": socket_name,
                "reason": outcome.value,
                "endpoint": endpoint.decode(errors="replace"),
            },
        )
